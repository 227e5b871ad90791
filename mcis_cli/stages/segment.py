"""`mcis segment`: train DeepLab-LargeFOV on the pseudo masks (or on ground truth, the ceiling).

DeepLab's recipe (docs/method.md §4): batches of random scale/crop/mirror crops, SGD with the poly rate set
every iteration, cross-entropy over the valid pixels of full-resolution logits (each image's
mean, averaged, as Caffe's iter_size does; or pooled: segment.loss_norm). A DataLoader
prepares the next batches while the model trains; each crop's randomness comes from
(seed, epoch, index) alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mcis_cli import artifacts, engine, metrics, tracking, training
from mcis_cli.checkpoints import load_checkpoint
from mcis_cli.config import Config, SegmentCfg, SpeedCfg
from mcis_cli.data import transforms, voc
from mcis_cli.devices import derived_seed
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import hub_checkpoint, imagenet_path
from mcis_cli.models.deeplab import build_segmenter, param_groups
from mcis_cli.stages import StageResult

NAME = "segment"
LABELS = ("pseudo", "gt")
RESNET101_WEIGHTS = "resnet101-63fe2227.pth"  # torchvision's ImageNet ResNet-101 (V1)
IGNORE = transforms.IGNORE
CACHE_MB = 1024  # decoded training pairs kept per process, shared out among its loader workers
                 # (VOC's train_aug would take ~8 GB: a cache of small trees, like the toy one)


def poly_lr(base: float, iteration: int, max_iter: int, power: float) -> float:
    """DeepLab's "poly" policy: base * (1 - iteration / max_iter) ** power."""
    return base * (1.0 - iteration / max_iter) ** power


# ---- data ---------------------------------------------------------------------------------
class CropDataset(Dataset):
    """(image, mask) files -> one augmented crop, the image as uint8 3xHxW (`prepare` normalises
    whole batches on the device); the key (index, epoch) seeds the crop's RNG.

    Each pair is decoded and checked once and kept while `cache_mb` allows (the toy tree: 5 MB),
    so later epochs only augment; with workers, each worker keeps the pairs it has seen."""

    def __init__(self, items: list[tuple[Path, Path]], num_classes: int, seg: SegmentCfg, seed: int,
                 cache_mb: int = CACHE_MB):
        self.items = items
        self.num_classes = num_classes
        self.crop, self.mirror = seg.crop, seg.mirror
        self.scales, self.pick = (seg.scales, True) if seg.scales else (seg.scale_range, False)
        self.seed = seed
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.room = cache_mb * 2**20  # bytes the cache may still take

    def __len__(self) -> int:
        return len(self.items)

    def decoded(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item `index`'s image and mask, checked: from the cache, else read (and kept if it fits)."""
        if index in self.cache:
            return self.cache[index]
        image_path, mask_path = self.items[index]
        image = transforms.load_image(image_path)
        mask = transforms.read_index_png(mask_path)
        if image.shape[:2] != mask.shape:
            raise McisError(f"{mask_path}: size {mask.shape} differs from its image {image.shape[:2]}")
        if mask.max() >= self.num_classes and ((mask >= self.num_classes) & (mask != IGNORE)).any():
            raise McisError(f"{mask_path}: labels beyond 0..{self.num_classes - 1} and {IGNORE}")
        if image.nbytes + mask.nbytes <= self.room:
            self.cache[index] = image, mask
            self.room -= image.nbytes + mask.nbytes
        return image, mask

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key
        image, mask = self.decoded(index)
        rng = random.Random(derived_seed(self.seed, epoch, index))
        image, mask = transforms.random_scale_crop_flip(
            image, mask, self.crop, self.scales, self.mirror, rng, self.pick
        )
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int64))


def prepare(images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch on `device`, the uint8 images normalised there: a quarter of the bytes to
    copy, and one vectorised op instead of one per crop in the workers (the same values)."""
    images = images.to(device, non_blocking=True)
    return transforms.normalize(images), masks.to(device, non_blocking=True)


class EpochSampler(Sampler):
    """Endless (index, epoch) keys: a permutation per epoch drawn from (seed, epoch), split into
    `parts` (padded so every part gets as many) of which this is `part`, starting `start` keys
    into the stream."""

    def __init__(self, n: int, seed: int, part: int = 0, parts: int = 1, start: int = 0):
        self.n, self.seed, self.part, self.parts, self.start = n, seed, part, parts, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_part = math.ceil(self.n / self.parts)
        epoch, offset = divmod(self.start, per_part)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
            order = order.tolist()
            order += order[: per_part * self.parts - self.n]
            for index in order[self.part :: self.parts][offset:]:
                yield index, epoch
            epoch, offset = epoch + 1, 0


def _next_batch(batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next batch; a McisError raised in a worker comes back as its one-line message."""
    try:
        return next(batches)
    except McisError as exc:
        last = str(exc).strip().splitlines()[-1]
        raise McisError(last.removeprefix(f"{McisError.__module__}.McisError: ")) from None


def _training_items(job: engine.Job, labels: str) -> tuple[list[tuple[Path, Path]], int]:
    """(image, mask) pairs of the training list that have a mask, and how many had none."""
    cfg = job.cfg
    samples = voc.train_samples(cfg.data)
    if labels == "pseudo":
        folder = job.fetch(artifacts.PSEUDO)
        items = [(s.image, artifacts.mask_file(folder, s.id)) for s in samples]
        where = f"pseudolabel run {job.source.run_id}"
    else:
        items = [(s.image, voc.mask_path(cfg.data.root, s.id)) for s in samples]
        where = str(Path(cfg.data.root) / voc.MASKS)
    kept = [item for item in items if item[1].is_file()]
    if not kept:
        raise McisError(f"no training masks: none of the {len(samples)} training images has a mask in {where}")
    return kept, len(items) - len(kept)


def _val_samples(cfg: Config) -> list[voc.Sample]:
    """Validation images that have a ground-truth mask (none on a dataset without masks)."""
    try:
        samples = voc.split_samples(cfg.data.root, cfg.data.val_list)
    except McisError:
        return []
    return [s for s in samples if voc.mask_path(cfg.data.root, s.id).is_file()]


@torch.no_grad()
def validate(model: nn.Module, samples: list[voc.Sample], root: str, class_names: list[str],
             device: torch.device) -> dict[str, float]:
    """`val/miou` and `val/iou/<class>` of whole images at one scale, no flip, no CRF: the cheap
    numbers to watch, per class so that segment runs compare class by class in MLflow."""
    model.eval()
    cm = np.zeros((len(class_names), len(class_names)), np.int64)
    for sample in samples:
        x = transforms.to_tensor(transforms.load_image(sample.image))[None].to(device)
        pred = model(x).argmax(1)[0].cpu().numpy()
        cm += metrics.confusion_matrix(pred, voc.load_mask(root, sample.id), len(class_names))
    model.train()
    result = metrics.scores(cm, class_names)
    return metrics.mlflow_metrics({"miou": result["miou"], "iou": result["iou"]}, prefix="val/")


# ---- model --------------------------------------------------------------------------------
def _load_imagenet(model: nn.Module, seg: SegmentCfg) -> None:
    """torchvision's ImageNet file from the torch hub cache; this machine downloads nothing."""
    if seg.arch == "vgg16" and seg.width != 1.0:
        raise McisError(
            f"segment.pretrained needs segment.width 1 (got {seg.width}): ImageNet weights exist at "
            f"full width only; set segment.pretrained=false"
        )
    path = hub_checkpoint(RESNET101_WEIGHTS) if seg.arch == "resnet101" else imagenet_path(seg.batch_norm)
    name = path.name
    if not path.is_file():
        raise McisError(
            f"ImageNet weights for segment.arch={seg.arch} not found: put torchvision's {name} in "
            f"{path.parent}, or set segment.pretrained=false"
        )
    try:
        model.load_imagenet(load_checkpoint(path))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise McisError(f"{path} is not torchvision's {name} ({exc})") from None


def _load_weights(model: nn.Module, seg: SegmentCfg) -> None:
    """The pretrained init: `segment.weights`, a local state dict in the model's own keys (say a
    converted Caffe vgg16_20M / dpl_init), else torchvision's ImageNet file. The classifier is new
    in either case: a file's classifier.* is ignored, every other key must be there."""
    if seg.weights is None:
        _load_imagenet(model, seg)
        return
    path = Path(seg.weights)
    if not path.is_file():
        raise McisError(f"segment.weights file not found: {path} (a local .pth state dict in the "
                        f"segmenter's own keys; nothing is downloaded), or set segment.weights=null")
    state = load_checkpoint(path)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = str(exc).strip().splitlines()[-1].strip()
        raise McisError(f"segment.weights {path} does not fit segment.arch={seg.arch}: {detail}") from None
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has the unknown key {unexpected[0]}"
        raise McisError(f"segment.weights {path} is not a state dict of segment.arch={seg.arch}: it {what} "
                        f"({len(missing)} missing, {len(unexpected)} unknown keys)")


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor, norm: str = "pixels") -> torch.Tensor:
    """Cross-entropy over the valid (non-255) pixels: their mean over the whole batch
    (`pixels`), or each image's own mean, averaged over the images (`images`: Caffe's batch 1 x
    iter_size 10). An image without valid pixels adds 0 and still counts as one of the images,
    as Caffe normalises its loss by max(1, valid pixels); a batch without any gives 0, not NaN."""
    if norm == "images":
        per_pixel = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="none")
        valid = (masks != IGNORE).flatten(1).sum(1).clamp(min=1)
        return (per_pixel.flatten(1).sum(1) / valid).mean()
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum")
    return total / (masks != IGNORE).sum().clamp(min=1)


def train_step(trainer: training.Trainer, net: nn.Module, images: torch.Tensor, masks: torch.Tensor,
               where: str, norm: str = "pixels") -> float:
    """One step on a batch already on the device; returns its loss averaged over the ranks."""
    with trainer.autocast():
        loss = pixel_loss(net(images), masks, norm)
    return trainer.step(loss, {}, where)["total"]


def build_trainer(seg: SegmentCfg, speed: SpeedCfg, num_classes: int, device: torch.device,
                  imagenet: bool) -> tuple[training.Trainer, nn.Module]:
    """DeepLab (from ImageNet weights when `imagenet`) with SGD at DeepLab's lr multipliers, and
    the module a step calls: the model, under DDP when distributed."""
    model = build_segmenter(seg, num_classes)
    if imagenet:
        _load_weights(model, seg)
    model.to(device)
    optimizer = torch.optim.SGD(
        param_groups(model, seg.weight_decay, seg.lr_mult_bias, seg.lr_mult_classifier),
        lr=seg.lr, momentum=seg.momentum,
    )
    trainer = training.Trainer(NAME, model, optimizer, device, seg.amp, seg.log_every, speed)
    return trainer, trainer.parallel(model)


def _batches(cfg: Config, trainer: training.Trainer, items: list[tuple[Path, Path]], num_classes: int,
             start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's part of each batch from iteration `start` on; workers prepare the next ones."""
    part, parts = trainer.share
    local = cfg.segment.batch_size // parts
    return iter(DataLoader(
        CropDataset(items, num_classes, cfg.segment, cfg.seed, cache_mb=CACHE_MB // max(1, cfg.data.workers)),
        batch_size=local,
        sampler=EpochSampler(len(items), cfg.seed, part, parts, start=start * local),
        **training.loader_options(cfg, trainer.device),
        persistent_workers=cfg.data.workers > 0,
        prefetch_factor=4 if cfg.data.workers else None,
        generator=torch.Generator(),  # keeps the global RNG (dropout) untouched
    ))


def train_loop(job: engine.Job, trainer: training.Trainer, net: nn.Module, batches: Iterator,
               val: list[voc.Sample], class_names: list[str], start: int) -> dict[str, float]:
    """Iterations `start`.. at the poly rate, validating every val_every and saving the resume
    state every checkpoint_every; returns the last loss and the mean throughput."""
    cfg, seg = job.cfg, job.cfg.segment
    value, busy, timed = float("nan"), 0.0, 0
    with trainer.progress(seg.iters, start, poly_lr(seg.lr, start, seg.iters, seg.poly_power)):
        tick = time.perf_counter()
        for it in range(start, seg.iters):
            lr = poly_lr(seg.lr, it, seg.iters, seg.poly_power)
            trainer.set_lr(lr)
            images, masks = prepare(*_next_batch(batches), trainer.device)
            value = train_step(trainer, net, images, masks, f"iteration {it}", seg.loss_norm)
            now = time.perf_counter()
            if it > start:  # the first step warms up allocators and workers
                busy, timed = busy + now - tick, timed + 1
            throughput = seg.batch_size / (now - tick)
            trainer.log_step(job.log, it, lr, value, {"loss": value, "throughput": throughput})
            done = it + 1
            if val and done % seg.val_every == 0 and done < seg.iters:
                job.report(lambda log, step=done: _validate(log, trainer, val, cfg, class_names, step))
            if done % seg.checkpoint_every == 0 and done < seg.iters:
                trainer.save(job.folder / artifacts.LAST, job.log, iteration=done)
            tick = time.perf_counter()  # validation and checkpoints are not step time
    return {"loss": value, **({"throughput": seg.batch_size * timed / busy} if timed else {})}


# ---- the stage ----------------------------------------------------------------------------
def _memory(cfg: Config) -> tuple[str, str]:
    seg = cfg.segment
    return f"batch {seg.batch_size} of {seg.crop} px crops, width {seg.width}", "segment.batch_size or segment.crop"


STAGE = engine.Stage(NAME, reads=("pseudolabel",), sections=(NAME,), memory=_memory)


@STAGE
def run(cfg: Config, from_run: str | None = None, labels: str = "pseudo", resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Train the segmenter; `labels="gt"` trains on ground-truth masks, the supervised ceiling.

    With `resume`, the run continues from its last checkpoint with its own labels and source run.
    """
    if labels not in LABELS:
        raise McisError(f"labels must be 'pseudo' or 'gt', got {labels!r}")
    seg = cfg.segment
    training.check_split(NAME, seg.batch_size)
    if resume:
        labels = tracking.get_run(cfg, resume, NAME).tags.get(tracking.LABELS_TAG, labels)
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent,
                       reads=None if labels == "pseudo" else (), extra={"labels": labels})
    class_names = ["background", *voc.class_names(cfg.data.root)]
    items, skipped = _training_items(job, labels)
    val = _val_samples(cfg) if seg.val_every else []
    trainer, net = build_trainer(seg, cfg.speed, len(class_names), job.device, imagenet=seg.pretrained)

    role = tracking.CEILING if labels == "gt" else None
    with job.open(tags={tracking.LABELS_TAG: labels}, role=role):
        def fresh_streams(state: dict) -> None:  # saved by another number of processes: streams anew
            trainer.seed_streams(cfg.seed, state["iteration"])

        state = trainer.resume(job.resume_file(artifacts.LAST), fresh_streams)
        if not state:  # a new run, or one killed before its first checkpoint: from the start
            trainer.seed_streams(cfg.seed)  # each process's own dropout stream
            job.report(lambda log: log.log_metrics({"train_images": len(items), "skipped_images": skipped}))
        if skipped:
            job.warn(f"segment: {skipped} training images have no {labels} mask and are skipped")
        start = state["iteration"] if state else 0
        batches = _batches(cfg, trainer, items, len(class_names), start)
        result = train_loop(job, trainer, net, batches, val, class_names, start)
        del batches  # its workers stop before the final validation
        if val:
            scores = job.report(lambda log: _validate(log, trainer, val, cfg, class_names, seg.iters))
            if scores:
                result["val/miou"] = scores["val/miou"]
        trainer.write(job.folder / artifacts.MODEL, artifacts.segmenter_file(
            trainer.model, seg, class_names, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD), job.log)
    return job.result(result, {"model": str(job.folder / artifacts.MODEL)})


def _validate(log: tracking.Tracker, trainer: training.Trainer, val: list[voc.Sample], cfg: Config,
              class_names: list[str], step: int) -> dict[str, float]:
    scores = validate(trainer.model, val, cfg.data.root, class_names, trainer.device)
    log.log_metrics(scores, step=step)
    return scores
