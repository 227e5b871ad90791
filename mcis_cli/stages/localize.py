"""`mcis localize`: a localization map per ground-truth class of every training image
(docs/method.md §2.8).

Method `mcis`: for each class c of an image X, the co-attention map of X is averaged over
`partners` related images holding c; three self-pairs (X with its flip, its 0.75x and its 2x view)
add four more maps, and `fuse` combines them as the official test.py does. For the ablation,
`self_pairs: false` keeps the cross-image map alone and `partners: 0` the four self-pair maps; the
fusion divides by the number of maps it was given (5 in the official setting), so a map that every
candidate supports still peaks at 1. Method `cam`: the plain CAM head of the same checkpoint.

The backbone + extra convs are the expensive part, and with 3 partners per class an image takes
part in many pairs, so each image's features are computed once and kept in an LRU cache while the
cheap pair heads run on batches of pairs. `naive=True` recomputes the features for every pair as the
official code does; it exists to prove the maps identical and for the benchmark.

Partners are drawn from a generator seeded by (seed, image index): the same run gives the same
maps, and a killed run, started again, computes only the chunks it had not finished.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mcis_cli import artifacts, engine, maprun, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.data.pairs import PairSampler
from mcis_cli.errors import McisError
from mcis_cli.models.mcis import VIEW_SCALES, MCISNet
from mcis_cli.progress import note
from mcis_cli.stages import StageResult

Forward = Callable[[torch.Tensor], torch.Tensor]


# ---- the fusion rule (§2.8 step 3) -----------------------------------------------------------
def fuse(maps: torch.Tensor, scores: torch.Tensor, gate: float) -> torch.Tensor:
    """Fuse M candidate maps per class: (M, n, h, w) raw maps, (M, n) their mean scores -> (n, h, w).

    Each map is normalised by the max of its ReLU; the first is always used, a later one only if
    sigmoid(its mean score) > gate; the sum is divided by M whatever was skipped (as the official
    code divides by 5), so a class that only the first map supports stays dim.
    """
    relu = maps.clamp(min=0)
    norm = relu / (relu.amax(dim=(-2, -1), keepdim=True) + 1e-8)
    keep = torch.sigmoid(scores) > gate
    keep[0] = True
    return (norm * keep[..., None, None]).sum(0) / maps.shape[0]


def cam_maps(cams: torch.Tensor) -> torch.Tensor:
    """Plain CAM maps (n, h, w) from class activations: ReLU, then each class divided by its max."""
    relu = cams.clamp(min=0)
    return relu / (relu.amax(dim=(-2, -1), keepdim=True) + 1e-8)


def to_image_size(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps in [0, 1] -> float32 (n, H, W), bicubic like the official cv2 resize, clipped."""
    if maps.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    out = F.interpolate(maps[None].float(), size=size, mode="bicubic", align_corners=False)[0]
    return out.clamp_(0, 1).cpu().numpy()


# ---- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    index: int
    sample: voc.Sample
    partners: tuple[tuple[int, ...], ...]  # related image indices, one tuple per class in labels


def plan(samples: Sequence[voc.Sample], partners: int, seed: int) -> list[Item]:
    """Partner draws for every image: with replacement among the images holding each class
    (possibly the image itself, as the official code), from a generator seeded by (seed, index)."""
    sampler = PairSampler([s.labels for s in samples], seed)
    items = []
    for index, sample in enumerate(samples):
        rng = random.Random(f"localize:{seed}:{index}")
        draws = tuple(tuple(sampler.related(c, partners, rng)) if partners else () for c in sample.labels)
        items.append(Item(index, sample, draws))
    return items


def view(image: np.ndarray, size: int) -> torch.Tensor:
    """The classifier's input: the image squashed to size x size, normalised (official Resize)."""
    return transforms.to_tensor(transforms.resize(image, (size, size)))


def self_views(image: np.ndarray, size: int) -> list[torch.Tensor]:
    """The partner views of the self-pairs: flip, 0.75x and 2x of the square input."""
    flip = view(image, size).flip(-1)
    return [flip] + [view(image, round(size * s)) for s in VIEW_SCALES]


# ---- the pair heads, shared by the cached and the naive paths ----------------------------------
def self_pair_maps(model: MCISNet, f: torch.Tensor, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maps of the self-pairs on features f (B, C, h, w) and the features of the flip / 0.75x / 2x
    views: (4, B, K, h, w) in fusion order [flip Q1, flip-back Q2, 0.75x Q2, 2x Q2], the resized
    views' maps brought to f's grid (bicubic, as the official code)."""
    h, w = f.shape[-2:]
    g1, g2 = model.coattend(f, views[0])
    maps = [model.coatt_maps(g1), model.coatt_maps(g2).flip(-1)]
    for fv in views[1:]:
        q = model.coatt_maps(model.coattend(f, fv)[1])
        maps.append(F.interpolate(q, size=(h, w), mode="bicubic", align_corners=False))
    return torch.stack(maps)


def cross_maps(model: MCISNet, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Co-attention maps Q1 (B, K, h, w) of the first images of a batch of pairs."""
    return model.coatt_maps(model.coattend(f1, f2)[0])


def candidates(items: Sequence[Item], self_maps: torch.Tensor | None, cross: Sequence[torch.Tensor],
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item, the fusion inputs for its classes: (M, n, h, w) maps and their (M, n) mean scores
    (the GAP scores that the gate of §2.8 tests).

    `self_maps` is (4, B, K, h, w) or None; `cross[k]` is item k's (n, h, w) partner-averaged maps,
    or None without partners. The cross-image map comes last, as in §2.8.
    """
    out = []
    for k, item in enumerate(items):
        maps = [] if self_maps is None else list(self_maps[:, k, list(item.sample.labels)])
        if cross[k] is not None:
            maps.append(cross[k])
        stack = torch.stack(maps) if maps else None  # None: an image without labels or pairs
        out.append((stack, None if stack is None else stack.mean((-2, -1))))
    return out


# ---- the feature cache and the two computation paths ----------------------------------------
def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with rows of zeros appended up to `rows` rows."""
    return torch.cat([x, x.new_zeros(rows - len(x), *x.shape[1:])]) if len(x) < rows else x


def fixed_batches(forward: Forward, x: torch.Tensor, batch: int) -> torch.Tensor:
    """`forward` over the rows of x (one shape) in batches of exactly `batch` rows, the last one
    padded: a kernel may round differently at another batch shape (PyTorch's CPU convolutions
    take another code path for a batch of one), not at the same one, so what a row gives does
    not depend on how many rows came with it (`rows_independent` checks the rest)."""
    out = []
    for s in range(0, len(x), batch):
        part = x[s : s + batch]
        out.append(forward(padded(part, batch))[: len(part)])
    return torch.cat(out)


def rows_independent(forward: Forward, x: torch.Tensor) -> bool:
    """Whether `forward` gives each row of the full batch x its own result, bit for bit: the
    same with the rows in reverse order and with the first row among zeros. A kernel that mixes
    rows or works by position (some GPU algorithms may) fails it."""
    out = forward(x)
    reversed_rows = forward(x.flip(0)).flip(0)
    alone = forward(padded(x[:1], len(x)))[:1]
    return torch.equal(out, reversed_rows) and torch.equal(out[:1], alone)


class FeatureCache:
    """Backbone features of training images at the classifier size, LRU-bounded in bytes: old
    entries are evicted before a new one is stored, so `bytes` (and `peak`) never pass the budget.
    The features of one `get` call are held by its caller beyond the budget until it drops them.

    Misses are computed in batches of exactly `batch` images (`fixed_batches`), so an image's
    features are the same bits whatever was asked for with them (another shard, a resumed start,
    another chunk). The first batch is checked (`rows_independent`); on a device where a row's
    result depends on its batch the cache says so once and computes one image at a time.
    """

    def __init__(self, model: MCISNet, samples: Sequence[voc.Sample], size: int,
                 device: torch.device, budget_mb: int, batch: int = 1):
        self.model, self.samples, self.size, self.device = model, samples, size, device
        self.budget = budget_mb * 2**20
        self.batch, self.checked = batch, batch == 1
        self.store: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bytes = self.peak = 0
        self.hits = self.misses = 0

    def get(self, indices: Sequence[int]) -> list[torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        for i in dict.fromkeys(indices):
            if i in self.store:
                self.store.move_to_end(i)
                found[i] = self.store[i]
        missing = [i for i in dict.fromkeys(indices) if i not in found]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        for s in range(0, len(missing), self.batch):
            group = missing[s : s + self.batch]
            for i, feature in zip(group, self.compute(group), strict=True):
                found[i] = feature.clone()  # not a view that keeps the whole batch alive
                self._put(i, found[i])
        return [found[i] for i in indices]

    def compute(self, indices: Sequence[int]) -> torch.Tensor:
        """The features (B, C, h, w) of these training images (the benchmark replaces it to replay
        a VOC-sized access pattern without the network)."""
        x = torch.stack([view(transforms.load_image(self.samples[i].image), self.size) for i in indices])
        x = x.to(self.device)
        if not self.checked:
            self.checked = True
            if not rows_independent(self.model.features, padded(x[: self.batch], self.batch)):
                note(f"warning: localize: on {self.device} an image's features in a batch of {self.batch} "
                     "depend on the other images of the batch; computing them one at a time "
                     "(localize.feature_batch=1 does so without this check)")
                self.batch = 1
        return fixed_batches(self.model.features, x, self.batch)

    def _put(self, index: int, feature: torch.Tensor) -> None:
        size = feature.numel() * feature.element_size()
        if size > self.budget:
            return
        while self.bytes + size > self.budget:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.store[index] = feature
        self.bytes += size
        self.peak = max(self.peak, self.bytes)


def cached_candidates(model: MCISNet, items: Sequence[Item], images: Sequence[np.ndarray],
                      cache: FeatureCache, self_pairs: bool, batch_size: int):
    """Fusion inputs for a chunk of items: features from the cache, pair heads in batches."""
    device = cache.device
    f = torch.stack(cache.get([item.index for item in items]))
    self_maps = None
    if self_pairs:
        views = list(zip(*(self_views(image, cache.size) for image in images), strict=True))
        fv = [fixed_batches(model.features, torch.stack(v).to(device), batch_size) for v in views]
        self_maps = torch.cat([
            self_pair_maps(model, f[s : s + batch_size], [v[s : s + batch_size] for v in fv])
            for s in range(0, len(items), batch_size)
        ], dim=1)
    pairs = [(k, ci, j) for k, item in enumerate(items)
             for ci, js in enumerate(item.partners) for j in js]
    partner_f = cache.get([j for _, _, j in pairs])
    found: list[list[list[torch.Tensor]]] = [[[] for _ in item.partners] for item in items]
    for s in range(0, len(pairs), batch_size):
        batch = pairs[s : s + batch_size]
        q = cross_maps(model, f[[k for k, _, _ in batch]], torch.stack(partner_f[s : s + batch_size]))
        for row, (k, ci, _) in enumerate(batch):
            found[k][ci].append(q[row, items[k].sample.labels[ci]])
    return candidates(items, self_maps, [_average(per_class) for per_class in found])


def _average(per_class: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor | None:
    """Partner maps of one image, a list per class -> (n, h, w) class-wise means; None if none."""
    if not any(per_class):
        return None
    return torch.stack([torch.stack(list(maps)).mean(0) for maps in per_class])


def naive_candidates(model: MCISNet, item: Item, image: np.ndarray, samples: Sequence[voc.Sample],
                     size: int, self_pairs: bool, device: torch.device):
    """The official way: every pair runs the whole network on both images, one pair at a time."""
    x = view(image, size)[None].to(device)
    self_maps = None
    if self_pairs:
        views = [model.features(v[None].to(device)) for v in self_views(image, size)]
        self_maps = self_pair_maps(model, model.features(x), views)
    found = [[cross_maps(model, model.features(x), model.features(
                 view(transforms.load_image(samples[j].image), size)[None].to(device)))[0, c]
              for j in js] for c, js in zip(item.sample.labels, item.partners, strict=True)]
    return candidates([item], self_maps, [_average(found)])[0]


@torch.inference_mode()
def compute_maps(model: MCISNet, items: Sequence[Item], samples: Sequence[voc.Sample], size: int,
                 *, method: str = "mcis", self_pairs: bool = True, gate: float = 0.1,
                 batch_size: int = 8, cache: FeatureCache | None = None, naive: bool = False,
                 device: torch.device | None = None):
    """Yield (item, float32 maps (n, H, W) in [0, 1]) for each item, chunk by chunk."""
    device = device or torch.device("cpu")
    if cache is None and not naive:
        cache = FeatureCache(model, samples, size, device, 0)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [transforms.load_image(item.sample.image) for item in chunk]
        if method == "cam":
            f = torch.stack(cache.get([item.index for item in chunk])) if cache else torch.cat(
                [model.features(view(image, size)[None].to(device)) for image in images])
            cams = F.conv2d(f, model.cam_head.weight)  # CAM as Zhou et al. 2016: no bias
            fused = [cam_maps(c[list(item.sample.labels)]) for c, item in zip(cams, chunk, strict=True)]
        else:
            if naive:
                inputs = [naive_candidates(model, item, image, samples, size, self_pairs, device)
                          for item, image in zip(chunk, images, strict=True)]
            else:
                inputs = cached_candidates(model, chunk, images, cache, self_pairs, batch_size)
            fused = [torch.zeros(0, 1, 1) if maps is None else fuse(maps, scores, gate)
                     for maps, scores in inputs]
        for item, image, maps in zip(chunk, images, fused, strict=True):
            yield item, to_image_size(maps, image.shape[:2])


# ---- the stage -------------------------------------------------------------------------------
def _check(cfg: Config, meta: dict | None = None, names: Sequence[str] = ()) -> None:
    """Refuse configurations that cannot give maps: before (config only) and after loading."""
    lc = cfg.localize
    if lc.method == "mcis" and lc.partners == 0 and not lc.self_pairs:
        raise McisError("localize.partners=0 with localize.self_pairs=false leaves no pair to "
                        "localize with; set one of them")
    if meta is None:
        return
    if lc.method == "mcis" and meta.get("method") == "cam":
        raise McisError("the classify run was trained with method cam, so its co-attention head is "
                        "untrained; use --set localize.method=cam or a classify run with method mcis")
    if int(meta["num_classes"]) != len(names):
        raise McisError(f"the checkpoint has {meta['num_classes']} classes but {cfg.data.root} has "
                        f"{len(names)}; localize with the dataset the classifier was trained on")


def _work(item: Item) -> int:
    """What an image costs, for balancing the shares: its own features and self-pairs, and a
    pair head per partner."""
    return 4 + sum(len(js) for js in item.partners)


def _memory(cfg: Config) -> tuple[str, str]:
    lc = cfg.localize
    size = f"{lc.input_size} px" if lc.input_size else "the classifier's size"
    return (f"batches of {lc.batch_size} at {size} with a {lc.cache_mb} MB feature cache filled "
            f"{lc.feature_batch} images at a time", "localize.batch_size, localize.feature_batch or localize.cache_mb")


STAGE = engine.Stage("localize", reads=("classify",), sections=("localize", "quality"), memory=_memory)


@STAGE
def run(cfg: Config, from_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Maps for every training image, in chunks of `localize.batch_size` images: the same chunks
    however the work is shared out, so every map is the one a single process computes."""
    _check(cfg)
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent)
    model, meta = job.first(lambda: artifacts.load_classifier(job.source, job.device))
    names = voc.class_names(cfg.data.root)
    _check(cfg, meta, names)
    samples = voc.train_samples(cfg.data)
    lc = cfg.localize
    size = lc.input_size or int(meta["input_size"])
    items = plan(samples, lc.partners if lc.method == "mcis" else 0, cfg.seed)
    cache = FeatureCache(model, samples, size, job.device, lc.cache_mb, lc.feature_batch)

    with job.open(tags={tracking.METHOD_TAG: lc.method}):
        def process(todo: list[Item]):
            for item, planes in compute_maps(model, todo, samples, size, method=lc.method, self_pairs=lc.self_pairs,
                                             gate=lc.gate, batch_size=lc.batch_size, cache=cache, device=job.device):
                yield item, maprun.save(cfg, job.folder, item.sample, planes, len(names) + 1)

        records = job.map("localize", items, process, key=lambda item: item.sample.id, weight=_work,
                          chunk=lc.batch_size)
        result, scored = maprun.summary(job, records, ["background", *names])
        cached = job.combine({"hits": cache.hits, "misses": cache.misses})
        peak = job.combine({"peak": cache.peak}, how="max")["peak"]  # each process has its own budget
        if cached["hits"] + cached["misses"]:
            result["maps/cache_hit_rate"] = cached["hits"] / (cached["hits"] + cached["misses"])
            result["maps/cache_peak_mb"] = peak / 2**20  # never above localize.cache_mb
        job.report(lambda log: maprun.report(log, cfg, samples, job.folder, result, scored))
    return job.result(maprun.headline(result), {artifacts.MAPS: str(job.folder / artifacts.MAPS)})

