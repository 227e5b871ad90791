"""Stage 1: train the co-attention classifier on same-class image pairs (method reference §1-§2).

Every random choice (visiting order, partners, colour jitter) follows from (seed, epoch, index),
so a resumed run and a torchrun run see exactly the data of an uninterrupted single process.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcis_cli import runtime
from mcis_cli.config import ClassifyCfg, Config
from mcis_cli.data import transforms, voc
from mcis_cli.data.pairs import PairSampler, shard
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import load_imagenet
from mcis_cli.models.mcis import MCISNet, build_classifier, gap, mcis_loss, param_groups
from mcis_cli.progress import training_progress
from mcis_cli.stages import StageResult
from mcis_cli.tracking import Nest, SourceRun, get_run, stage_run

STAGE = "classify"
VIEW_SCALES = (0.75, 2.0)  # the resized self-pair views; the flip view keeps the input size


def chw(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> uint8 3xHxW; `prepare` normalises whole batches on the device."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def prepare(value, device: torch.device):
    """A collated batch (or part of one) on `device`, uint8 images as normalised float32."""
    if isinstance(value, dict):
        return {k: prepare(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [prepare(v, device) for v in value]
    value = value.to(device, non_blocking=True)
    if value.dtype != torch.uint8:
        return value
    mean = torch.tensor(transforms.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(transforms.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (value.float() / 255 - mean) / std


def multi_hot(labels: tuple[int, ...], num_classes: int) -> torch.Tensor:
    y = torch.zeros(num_classes)
    y[list(labels)] = 1.0
    return y


class ClassifyDataset(Dataset):
    """Item i: image i squashed to a square, its labels, and optionally its partner and views.

    Training items carry the epoch's partner (both colour-jittered) and the three un-jittered
    self-pair views of the first image: horizontal flip, 0.75x and 2x. Call `set_epoch` first.
    """

    def __init__(self, samples: list[voc.Sample], num_classes: int, cfg: ClassifyCfg, seed: int,
                 train: bool):
        self.samples, self.num_classes, self.seed = samples, num_classes, seed
        self.size = cfg.input_size
        self.jitter = cfg.color_jitter if train else [0.0] * 4
        self.pairs = train and cfg.method == "mcis"
        self.views = self.pairs and cfg.self_pairs
        self.sampler = PairSampler([s.labels for s in samples], seed)
        self.epoch, self.partners = 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.partners = self.sampler.epoch_partners(epoch) if self.pairs else []

    def __len__(self) -> int:
        return len(self.samples)

    def _jittered(self, square: np.ndarray, index: int, slot: int) -> torch.Tensor:
        if any(self.jitter):
            rng = random.Random(f"jitter:{self.seed}:{self.epoch}:{index}:{slot}")  # str seeds are stable
            square = transforms.color_jitter(square, self.jitter, rng)
        return chw(square)

    def _square(self, image: np.ndarray) -> np.ndarray:
        return transforms.resize(image, (self.size, self.size))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = transforms.load_image(sample.image)
        square = self._square(image)
        item = {"x1": self._jittered(square, index, 0), "y1": multi_hot(sample.labels, self.num_classes)}
        if self.pairs:
            partner = self.samples[self.partners[index]]
            item["x2"] = self._jittered(self._square(transforms.load_image(partner.image)), index, 1)
            item["y2"] = multi_hot(partner.labels, self.num_classes)
        if self.views:
            sides = [round(self.size * scale) for scale in VIEW_SCALES]
            item["views"] = [chw(square[:, ::-1])] + [chw(transforms.resize(image, (s, s))) for s in sides]
        return item


def epoch_batches(sampler: PairSampler, epoch: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's part of every global batch of the epoch: global batch k is order[kB:(k+1)B],
    split with stride `world` (the order is padded to a multiple of the world size)."""
    local = shard(sampler.epoch_order(epoch), rank, world)
    size = batch_size // world
    return [local[i : i + size] for i in range(0, len(local), size)]


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes with a positive of the average precision (precision at each hit)."""
    aps = []
    for c in range(labels.shape[1]):
        hits = labels[np.argsort(-scores[:, c], kind="stable"), c] > 0
        if hits.any():
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            aps.append(precision[hits].mean())
    return float(np.mean(aps)) if aps else float("nan")


class Criterion(nn.Module):
    """The model and its loss as one module, so DDP sees a single forward per step."""

    def __init__(self, model: MCISNet, cfg: ClassifyCfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, Any], epoch: int):
        return mcis_loss(self.model, batch, epoch, self.cfg)


class Trainer:
    """Model, optimizer and the training step of one process; `train_epoch` is the timed loop."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, imagenet: bool):
        c = self.ccfg = cfg.classify
        self.device = device
        self.model = build_classifier(c, num_classes)
        if imagenet:
            load_imagenet(self.model.backbone, c.batch_norm)
        self.model.to(device)
        criterion = Criterion(self.model, c)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.criterion = (
            runtime.data_parallel(
                criterion, device,
                find_unused_parameters=True,  # the gate waits for contrastive_from_epoch
            )
            if self.distributed else criterion
        )
        groups = param_groups(self.model, c.lr, c.lr_mult)
        if c.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             weight_decay=c.weight_decay)
        self.amp = self.ccfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.last_checkpoint: Path | None = None

    def set_epoch_lr(self, epoch: int) -> float:
        """Step decay: lr x decay_factor at each decay epoch reached; returns the base lr."""
        lr = self.ccfg.lr * self.ccfg.decay_factor ** sum(epoch >= e for e in self.ccfg.decay_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        return lr

    def train_step(self, batch: dict[str, Any], epoch: int, step: int) -> dict[str, float]:
        """One SGD step; returns the loss terms averaged over every process (a non-finite one stops)."""
        with torch.autocast(self.device.type, enabled=self.amp):
            total, parts = self.criterion(prepare(batch, self.device), epoch)
        values = torch.stack([total.detach().float(), *(p.detach().float() for p in parts.values())])
        if self.distributed:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        terms = dict(zip(["total", *parts], values.tolist(), strict=True))
        if not all(math.isfinite(v) for v in terms.values()):
            where = self.last_checkpoint or "none yet (the first epoch did not finish)"
            raise McisError(
                f"non-finite loss {terms} at step {step} (epoch {epoch}); last good checkpoint: "
                f"{where}; lower classify.lr in a new run, or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def train_epoch(self, loader: DataLoader, epoch: int, step: int, lr: float, tracker, progress,
                    task) -> tuple[int, float]:
        """Train one epoch from global step `step`; returns (next step, mean total loss)."""
        self.model.train()
        totals = []
        for batch in loader:
            terms = self.train_step(batch, epoch, step)
            if tracker is not None and step % self.ccfg.log_every == 0:
                tracker.log_metrics({"lr": lr, **{f"loss/{k}": v for k, v in terms.items()}}, step=step)
            totals.append(terms["total"])
            step += 1
            progress.update(task, advance=1, loss=terms["total"], lr=lr)
        return step, float(np.mean(totals))

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Multi-label loss and mAP of the plain CAM scores of single images."""
        self.model.eval()
        scores, labels = [], []
        for batch in loader:
            with torch.autocast(self.device.type, enabled=self.amp):
                s = gap(self.model.cam(self.model.features(prepare(batch["x1"], self.device))))
            scores.append(s.float().cpu())
            labels.append(batch["y1"])
        s, y = torch.cat(scores), torch.cat(labels)
        return {
            "val/loss": F.multilabel_soft_margin_loss(s, y).item(),
            "val/mAP": mean_average_precision(s.numpy(), y.numpy()),
        }

    def model_checkpoint(self) -> dict[str, Any]:
        """What localize loads: weights + the hyper-parameters to rebuild the model."""
        return {
            "state_dict": self.model.state_dict(), "num_classes": self.model.num_classes,
            "width": self.model.width, "batch_norm": self.model.batch_norm, "blocks": self.model.blocks,
            "affinity": self.model.affinity_kind, "temperature": self.model.temperature,
            "input_size": self.ccfg.input_size, "method": self.ccfg.method,
        }

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": epoch, "global_step": step,
            "rng": runtime.rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> tuple[int, int]:
        """Restore a `state`; returns (next epoch, global step)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"])
        return state["epoch"] + 1, state["global_step"]


def _resume_checkpoint(cfg: Config, prior: SourceRun) -> Path | None:
    """last.pt of the run, None when it has none (killed before its first epoch ended: it starts
    over, as an uninterrupted run would)."""
    local = Path(cfg.output_dir) / prior.run_id / "checkpoints" / "last.pt"
    return prior.local_or_fetched(local, "checkpoints/last.pt")


def _check(cfg: Config, world_size: int) -> None:
    c = cfg.classify
    if c.pretrained and c.width != 1.0:
        raise McisError(
            f"classify.pretrained needs classify.width=1 (got {c.width}): ImageNet VGG16 weights exist "
            "only at full width; set classify.pretrained=false to train a narrower network from scratch"
        )
    if c.batch_size % world_size:
        raise McisError(
            f"classify.batch_size {c.batch_size} cannot be split over {world_size} processes; "
            "use a multiple of the process count"
        )


def run(cfg: Config, resume: str | None = None, parent: Nest | None = None) -> StageResult:
    """Train (or with `resume`, continue) a classifier; log to MLflow; return the summary."""
    c = cfg.classify
    runtime.init_distributed(cfg.device)
    rank, world_size = runtime.world()
    _check(cfg, world_size)
    prior = get_run(cfg, resume, STAGE) if resume else None
    if prior:
        prior.require_same(cfg, "classify")
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed, cfg.deterministic)
    classes = voc.class_names(cfg.data.root)
    train_set = ClassifyDataset(voc.train_samples(cfg.data), len(classes), c, cfg.seed, train=True)
    val_set = ClassifyDataset(voc.split_samples(cfg.data.root, cfg.data.val_list), len(classes), c,
                              cfg.seed, train=False)
    if not len(train_set):
        raise McisError(f"the training list {cfg.data.train_list!r} of {cfg.data.root} is empty")
    trainer = Trainer(cfg, len(classes), device, imagenet=c.pretrained and not resume)
    progress = training_progress()
    progress.disable = not runtime.is_main()
    if c.amp and not trainer.amp:
        progress.console.print("[yellow]warning:[/] classify.amp needs CUDA; training in fp32")
    loader_args = {"num_workers": cfg.data.workers, "pin_memory": device.type == "cuda"}
    val_loader = DataLoader(val_set, batch_size=c.batch_size, **loader_args)

    with (stage_run(cfg, STAGE, resume=resume, parent=parent) if runtime.is_main()
          else contextlib.nullcontext()) as tracker:
        run_id = runtime.broadcast_str(tracker.run_id if tracker else "")
        ckpt_dir = Path(cfg.output_dir) / run_id / "checkpoints"
        start_epoch, step = 0, 0
        if resume:
            path = runtime.broadcast_str(str(_resume_checkpoint(cfg, prior) or "") if runtime.is_main() else "")
            if path:
                start_epoch, step = trainer.load_state(runtime.load_checkpoint(path, device))
                trainer.last_checkpoint = ckpt_dir / "last.pt"
            elif c.pretrained:
                load_imagenet(trainer.model.backbone, c.batch_norm)
        elif tracker is not None:
            tracker.set_tags({"mcis.method": c.method})
            tracker.log_params({"world_size": world_size, "effective_batch": c.batch_size})
        keep_epoch = min(c.checkpoint_epoch, c.epochs - 1)
        steps_per_epoch = len(epoch_batches(train_set.sampler, 0, c.batch_size, rank, world_size))
        metrics: dict[str, float] = {}
        with progress:
            task = progress.add_task(STAGE, total=c.epochs * steps_per_epoch,
                                     completed=start_epoch * steps_per_epoch, loss=float("nan"), lr=c.lr)
            for epoch in range(start_epoch, c.epochs):
                lr = trainer.set_epoch_lr(epoch)
                train_set.set_epoch(epoch)
                batches = epoch_batches(train_set.sampler, epoch, c.batch_size, rank, world_size)
                loader = DataLoader(train_set, batch_sampler=batches, **loader_args)
                step, train_loss = trainer.train_epoch(loader, epoch, step, lr, tracker, progress, task)
                if runtime.is_main():
                    metrics = {"train/loss": train_loss, **trainer.validate(val_loader)}
                    tracker.log_metrics(metrics, step=epoch)
                    last = ckpt_dir / "last.pt"
                    runtime.save_checkpoint(last, trainer.state(epoch, step))
                    tracker.log_artifact(last, "checkpoints")
                    trainer.last_checkpoint = last
                    if epoch == keep_epoch:
                        for name in (f"epoch_{epoch}.pt", "model.pt"):
                            runtime.save_checkpoint(ckpt_dir / name, trainer.model_checkpoint())
                        tracker.log_artifact(ckpt_dir / "model.pt", "checkpoints")
                runtime.barrier()
    return StageResult(
        run_id=run_id,
        metrics={**metrics, "epochs": c.epochs, "steps": step},
        outputs={"checkpoint": str(ckpt_dir / "model.pt")},
    )
