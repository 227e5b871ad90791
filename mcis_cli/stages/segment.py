"""`mcis segment`: train DeepLab-LargeFOV on the pseudo masks (or on ground truth, the ceiling).

DeepLab's recipe [supp]: batches of random scale/crop/mirror crops, SGD with the poly rate set
every iteration, cross-entropy over the valid pixels of full-resolution logits. A DataLoader
prepares the next batches while the model trains; each crop's randomness comes from
(seed, epoch, index) alone, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mcis_cli import metrics, runtime, tracking
from mcis_cli.config import Config, SegmentCfg
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import hub_checkpoint, imagenet_path
from mcis_cli.models.deeplab import build_segmenter, param_groups
from mcis_cli.progress import console, training_progress
from mcis_cli.stages import StageResult

LABELS = ("pseudo", "gt")
LAST = "checkpoints/last.pt"  # resume state, rewritten every checkpoint_every iterations
MODEL = "checkpoints/model.pt"  # the trained model, read by evaluate and export
RESNET101_WEIGHTS = "resnet101-63fe2227.pth"  # torchvision's ImageNet ResNet-101 (V1)
IGNORE = transforms.IGNORE


def poly_lr(base: float, iteration: int, max_iter: int, power: float) -> float:
    """DeepLab's "poly" policy: base * (1 - iteration / max_iter) ** power."""
    return base * (1.0 - iteration / max_iter) ** power


def mix(*values: int) -> int:
    """One well-spread 32-bit seed from a few integers (seed, epoch, index, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


# ---- data ---------------------------------------------------------------------------------
class CropDataset(Dataset):
    """(image, mask) files -> one augmented crop; the key (index, epoch) seeds the crop's RNG."""

    def __init__(self, items: list[tuple[Path, Path]], num_classes: int, seg: SegmentCfg, seed: int):
        self.items = items
        self.num_classes = num_classes
        self.crop, self.scale_range, self.mirror = seg.crop, seg.scale_range, seg.mirror
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key
        image_path, mask_path = self.items[index]
        image = transforms.load_image(image_path)
        mask = transforms.read_index_png(mask_path)
        if image.shape[:2] != mask.shape:
            raise McisError(f"{mask_path}: size {mask.shape} differs from its image {image.shape[:2]}")
        if mask.max() >= self.num_classes and ((mask >= self.num_classes) & (mask != IGNORE)).any():
            raise McisError(f"{mask_path}: labels beyond 0..{self.num_classes - 1} and {IGNORE}")
        rng = random.Random(mix(self.seed, epoch, index))
        image, mask = transforms.random_scale_crop_flip(
            image, mask, self.crop, self.scale_range, self.mirror, rng
        )
        return transforms.to_tensor(image), torch.from_numpy(mask.astype(np.int64))


class EpochSampler(Sampler):
    """Endless (index, epoch) keys: a permutation per epoch drawn from (seed, epoch), sharded
    over ranks (padded so every rank gets as many), starting `start` keys into the stream."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = math.ceil(self.n / self.world)
        epoch, offset = divmod(self.start, per_rank)
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(mix(self.seed, epoch)))
            order = order.tolist()
            order += order[: per_rank * self.world - self.n]
            for index in order[self.rank :: self.world][offset:]:
                yield index, epoch
            epoch, offset = epoch + 1, 0


def _next_batch(batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next batch; a McisError raised in a worker comes back as its one-line message."""
    try:
        return next(batches)
    except McisError as exc:
        last = str(exc).strip().splitlines()[-1]
        raise McisError(last.removeprefix(f"{McisError.__module__}.McisError: ")) from None


def _main_first(main: bool, fetch) -> Path:
    """Rank 0 fetches (maybe downloads) first; the other ranks then find the cached copy."""
    if not main:
        runtime.barrier()
    path = fetch()
    if main:
        runtime.barrier()
    return path


def _training_items(cfg: Config, labels: str, source, main: bool) -> tuple[list[tuple[Path, Path]], int]:
    """(image, mask) pairs of the training list that have a mask, and how many had none."""
    samples = voc.train_samples(cfg.data)
    if labels == "pseudo":
        folder = _main_first(main, lambda: source.fetch("pseudo"))
        items = [(s.image, folder / f"{s.id}.png") for s in samples]
        where = f"pseudolabel run {source.run_id}"
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
        model.load_imagenet(runtime.load_checkpoint(path))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise McisError(f"{path} is not torchvision's {name} ({exc})") from None


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict]:
    """The model of a `checkpoints/model.pt` artifact, in eval mode on the CPU, and its metadata
    (arch, num_classes, width, class_names with background first, mean, std)."""
    state = runtime.load_checkpoint(path)
    missing = {"state_dict", "arch", "num_classes", "width"} - state.keys()
    if missing:
        raise McisError(f"{path} is not a segment model file: it lacks {sorted(missing)}")
    seg = SegmentCfg(arch=state["arch"], width=state["width"], batch_norm=state.get("batch_norm", False),
                     blocks=state.get("blocks", 5))
    model = build_segmenter(seg, state["num_classes"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), {k: v for k, v in state.items() if k != "state_dict"}


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the valid pixels; 0 (not NaN) for a batch with none."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum")
    return total / (masks != IGNORE).sum().clamp(min=1)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, masks: torch.Tensor, amp: bool) -> torch.Tensor:
    """One forward/backward/update; returns the detached loss (no host sync)."""
    with torch.autocast(images.device.type, enabled=amp):
        loss = pixel_loss(net(images), masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _mean_over_ranks(value: torch.Tensor, distributed: bool) -> float:
    if distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _rng_states(distributed: bool) -> list:
    """Every rank's RNG state (dropout), gathered for rank 0's checkpoint."""
    if not distributed:
        return [runtime.rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, runtime.rng_state())
    return states


# ---- the stage ----------------------------------------------------------------------------
def run(cfg: Config, from_run: str | None = None, labels: str = "pseudo", resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Train the segmenter; `labels="gt"` trains on ground-truth masks, the supervised ceiling.

    With `resume`, the run continues from its last checkpoint with its own labels and source run.
    """
    if labels not in LABELS:
        raise McisError(f"labels must be 'pseudo' or 'gt', got {labels!r}")
    seg = cfg.segment
    distributed = runtime.init_distributed(cfg.device)
    rank, size = runtime.world()
    main = rank == 0
    if seg.batch_size % size:
        raise McisError(f"segment.batch_size {seg.batch_size} does not split over {size} processes; "
                        f"make it a multiple of {size}")
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed, cfg.deterministic)
    amp = seg.amp and device.type == "cuda"

    prior = tracking.get_run(cfg, resume, "segment") if resume else None
    if prior:
        prior.require_same(cfg, "segment")
        labels = prior.tags.get(tracking.LABELS_TAG, labels)
        from_run = prior.tags.get(tracking.SOURCE_TAG) or None
    source = tracking.resolve_run(cfg, "pseudolabel", from_run) if labels == "pseudo" else None
    class_names = ["background", *voc.class_names(cfg.data.root)]
    items, skipped = _training_items(cfg, labels, source, main)
    val = _val_samples(cfg) if seg.val_every else []

    model = build_segmenter(seg, len(class_names))
    if seg.pretrained and not resume:
        _load_imagenet(model, seg)
    model.to(device)
    optimizer = torch.optim.SGD(
        param_groups(model, seg.weight_decay, seg.lr_mult_bias, seg.lr_mult_classifier),
        lr=seg.lr, momentum=seg.momentum,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net = runtime.data_parallel(model, device) if distributed else model

    role = tracking.CEILING if labels == "gt" else None
    with (tracking.stage_run(cfg, "segment", source=source, role=role, resume=resume, parent=parent)
          if main else contextlib.nullcontext()) as tracker:
        run_id = runtime.broadcast_str(tracker.run_id if tracker else "")
        out = tracking.workdir(cfg, run_id) if main else Path(cfg.output_dir) / run_id
        start, last_good = 0, "none"
        path = _main_first(main, lambda: prior.local_or_fetched(out / LAST, LAST)) if prior else None
        if path:
            state = runtime.load_checkpoint(path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start, last_good = state["iteration"], str(path)
            if len(state["rng"]) == size:
                runtime.set_rng_state(state["rng"][rank])
            else:  # another world size: fresh per-rank streams
                torch.manual_seed(mix(cfg.seed, rank, start))
        else:  # a new run, or one killed before its first checkpoint: from the start
            torch.manual_seed(mix(cfg.seed, rank))  # per-rank dropout streams
            if prior and seg.pretrained:
                _load_imagenet(model, seg)
            if tracker is not None:
                tracker.set_tags({tracking.LABELS_TAG: labels})
                tracker.log_metrics({"train_images": len(items), "skipped_images": skipped})
        if skipped and main:
            console.print(f"segment: {skipped} training images have no {labels} mask and are skipped")

        per_rank = seg.batch_size // size
        loader = DataLoader(
            CropDataset(items, len(class_names), seg, cfg.seed),
            batch_size=per_rank,
            sampler=EpochSampler(len(items), cfg.seed, rank, size, start=start * per_rank),
            num_workers=cfg.data.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.data.workers > 0,
            prefetch_factor=4 if cfg.data.workers else None,
            generator=torch.Generator(),  # keeps the global RNG (dropout) untouched
        )
        batches = iter(loader)
        progress = training_progress()
        progress.disable = not main
        value, busy, timed = float("nan"), 0.0, 0
        with progress:
            task = progress.add_task("segment", total=seg.iters, completed=start, loss=value,
                                     lr=poly_lr(seg.lr, start, seg.iters, seg.poly_power))
            tick = time.perf_counter()
            for it in range(start, seg.iters):
                lr = poly_lr(seg.lr, it, seg.iters, seg.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_mult"]
                images, masks = _next_batch(batches)
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                loss = train_step(net, optimizer, scaler, images, masks, amp)
                value = _mean_over_ranks(loss, distributed)
                if not math.isfinite(value):
                    raise McisError(f"segment: loss is {value} at iteration {it}; last good checkpoint: "
                                    f"{last_good} (lower segment.lr in a new run, or check the data)")
                now = time.perf_counter()
                if it > start:  # the first step warms up allocators and workers
                    busy, timed = busy + now - tick, timed + 1
                if tracker is not None and it % seg.log_every == 0:
                    tracker.log_metrics({"lr": lr, "loss": value, "throughput": seg.batch_size / (now - tick)},
                                        step=it)
                progress.update(task, advance=1, loss=value, lr=lr)
                done = it + 1
                if val and done % seg.val_every == 0 and done < seg.iters:
                    if main:
                        tracker.log_metrics(validate(model, val, cfg.data.root, class_names, device), step=done)
                    runtime.barrier()
                if done % seg.checkpoint_every == 0 and done < seg.iters:
                    states = _rng_states(distributed)
                    if main:
                        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict(), "iteration": done, "rng": states}
                        runtime.save_checkpoint(out / LAST, state)
                        tracker.log_artifact(out / LAST, "checkpoints")
                        last_good = str(out / LAST)
                    runtime.barrier()
                tick = time.perf_counter()  # validation and checkpoints are not step time
        del batches

        result = {"loss": value}
        if timed:
            result["throughput"] = seg.batch_size * timed / busy
        if main:
            if val:
                scores = validate(model, val, cfg.data.root, class_names, device)
                tracker.log_metrics(scores, step=seg.iters)
                result["val/miou"] = scores["val/miou"]
            runtime.save_checkpoint(out / MODEL, {
                "state_dict": model.state_dict(), "arch": seg.arch, "num_classes": len(class_names),
                "width": model.width, "batch_norm": seg.batch_norm, "blocks": seg.blocks,
                "class_names": class_names,
                "mean": list(transforms.IMAGENET_MEAN), "std": list(transforms.IMAGENET_STD),
            })
            tracker.log_artifact(out / MODEL, "checkpoints")
        runtime.barrier()
    return StageResult(run_id, result, {"model": str(out / MODEL)})
