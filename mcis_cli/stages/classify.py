"""Stage 1: train the co-attention classifier on same-class image pairs (docs/method.md §1-§2).

Every random choice (visiting order, partners, colour jitter) follows from (seed, epoch, index),
so a resumed run and a torchrun run see exactly the data of an uninterrupted single process.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcis_cli import artifacts, engine, tracking, training
from mcis_cli.config import ClassifyCfg, Config
from mcis_cli.data import transforms, voc
from mcis_cli.data.pairs import PairSampler, shard
from mcis_cli.devices import set_rng_state
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import load_imagenet
from mcis_cli.models.mcis import (
    VIEW_SCALES,
    MCISNet,
    build_classifier,
    gap,
    mcis_loss,
)
from mcis_cli.stages import StageResult
from mcis_cli.tracking import Nest, Tracker

NAME = "classify"


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
    return transforms.normalize(value) if value.dtype == torch.uint8 else value


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


def epoch_batches(sampler: PairSampler, epoch: int, batch_size: int, part: int, parts: int) -> list[list[int]]:
    """Part `part` of `parts` of every global batch of the epoch: global batch k is order[kB:(k+1)B],
    split with stride `parts` (the order is padded to a multiple of `parts`)."""
    local = shard(sampler.epoch_order(epoch), part, parts)
    size = batch_size // parts
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


class Trainer(training.Trainer):
    """The classifier, its optimizer and its loss (under DDP when distributed); `train_epoch` is
    the timed loop, `validate` the check after each epoch (by the process that reports)."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, imagenet: bool):
        c = self.ccfg = cfg.classify
        model = build_classifier(c, num_classes)
        if imagenet:
            load_imagenet(model.backbone, c.batch_norm)
        model.to(device)
        super().__init__(NAME, model, training.optimizer(model, c), device, c.amp, c.log_every, cfg.speed)
        # find_unused_parameters: the gate waits for contrastive_from_epoch
        self.criterion = self.parallel(Criterion(model, c), find_unused_parameters=True)

    def train_epoch(self, loader, epoch: int, step: int, tracker: Tracker | None) -> tuple[int, float]:
        """Train one epoch at its lr from global step `step`; returns (next step, mean total loss)."""
        lr = training.step_decay(self.ccfg, epoch)
        self.set_lr(lr)
        self.model.train()
        totals = []
        for batch in loader:
            with self.autocast():
                total, parts = self.criterion(prepare(batch, self.device), epoch)
            terms = self.step(total, parts, f"step {step} (epoch {epoch})")
            self.log_step(tracker, step, lr, terms["total"], {f"loss/{k}": v for k, v in terms.items()})
            totals.append(terms["total"])
            step += 1
        return step, float(np.mean(totals))

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Multi-label loss and mAP of the plain CAM scores of single images."""
        self.model.eval()
        scores, labels = [], []
        for batch in loader:
            with self.autocast():
                s = gap(self.model.cam(self.model.features(prepare(batch["x1"], self.device))))
            scores.append(s.float().cpu())
            labels.append(batch["y1"])
        s, y = torch.cat(scores), torch.cat(labels)
        return {
            "val/loss": F.multilabel_soft_margin_loss(s, y).item(),
            "val/mAP": mean_average_precision(s.numpy(), y.numpy()),
        }

    def save_model(self, path: Path, epoch: int, tracker: Tracker | None) -> None:
        """The classifier localize uses, uploaded, and its copy epoch_<k>.pt beside it (kept local)."""
        content = artifacts.classifier_file(self.model, self.ccfg.input_size, self.ccfg.method)
        self.write(path.with_name(f"epoch_{epoch}.pt"), content)
        self.write(path, content, tracker)


def _check_pretrained(c: ClassifyCfg) -> None:
    if c.pretrained and c.width != 1.0:
        raise McisError(
            f"classify.pretrained needs classify.width=1 (got {c.width}): ImageNet VGG16 weights exist "
            "only at full width; set classify.pretrained=false to train a narrower network from scratch"
        )


def _first_process_rng(state: dict[str, Any]) -> None:
    """A state saved by another number of processes: the first one's RNG in every process (all
    start from one seed, so it is what each of them would have had)."""
    set_rng_state(state["rng"][0])


def train(job: engine.Job, trainer: Trainer, train_set: ClassifyDataset, val_loader: DataLoader,
          first_epoch: int, step: int) -> tuple[dict[str, float], int]:
    """Epochs `first_epoch`.. with validation, the model file at checkpoint_epoch and the resume
    state after each epoch; returns (the last epoch's validation metrics, the global step)."""
    cfg, c = job.cfg, job.cfg.classify
    keep_epoch = min(c.checkpoint_epoch, c.epochs - 1)
    per_epoch = len(epoch_batches(train_set.sampler, 0, c.batch_size, *trainer.share))
    metrics: dict[str, float] = {}
    with trainer.progress(c.epochs * per_epoch, first_epoch * per_epoch, c.lr):
        for epoch in range(first_epoch, c.epochs):
            train_set.set_epoch(epoch)
            batches = epoch_batches(train_set.sampler, epoch, c.batch_size, *trainer.share)
            loader = DataLoader(train_set, batch_sampler=batches,
                                **training.loader_options(cfg, trainer.device))
            step, train_loss = trainer.train_epoch(loader, epoch, step, job.log)
            metrics = job.report(lambda log, loss=train_loss, e=epoch: _validate(log, trainer, val_loader, loss, e)) or {}
            if epoch == keep_epoch:
                trainer.save_model(job.folder / artifacts.MODEL, epoch, job.log)
            trainer.save(job.folder / artifacts.LAST, job.log, epoch=epoch, global_step=step)
    return metrics, step


def _validate(log, trainer: Trainer, val_loader: DataLoader, train_loss: float, epoch: int) -> dict[str, float]:
    metrics = {"train/loss": train_loss, **trainer.validate(val_loader)}
    log.log_metrics(metrics, step=epoch)
    return metrics


def _memory(cfg: Config) -> tuple[str, str]:
    c = cfg.classify
    views = " and its self-pair views" if c.self_pairs else ""
    return f"{c.batch_size} pairs of {c.input_size} px{views}, width {c.width}", "classify.batch_size"


STAGE = engine.Stage(NAME, sections=(NAME,), memory=_memory)


@STAGE
def run(cfg: Config, resume: str | None = None, parent: Nest | None = None) -> StageResult:
    """Train (or continue) a classifier; log to MLflow; return the summary."""
    c = cfg.classify
    _check_pretrained(c)
    training.check_split(NAME, c.batch_size)
    job = engine.start(STAGE, cfg, resume=resume, parent=parent)
    classes = voc.class_names(cfg.data.root)
    train_set = ClassifyDataset(voc.train_samples(cfg.data), len(classes), c, cfg.seed, train=True)
    val_set = ClassifyDataset(voc.split_samples(cfg.data.root, cfg.data.val_list), len(classes), c,
                              cfg.seed, train=False)
    if not len(train_set):
        raise McisError(f"the training list {cfg.data.train_list!r} of {cfg.data.root} is empty")
    trainer = Trainer(cfg, len(classes), job.device, imagenet=c.pretrained)
    val_loader = DataLoader(val_set, batch_size=c.batch_size, **training.loader_options(cfg, job.device))

    with job.open(tags={tracking.METHOD_TAG: c.method}, params={"effective_batch": c.batch_size}):
        state = trainer.resume(job.resume_file(artifacts.LAST), _first_process_rng)
        first_epoch, step = (state["epoch"] + 1, state["global_step"]) if state else (0, 0)
        metrics, step = train(job, trainer, train_set, val_loader, first_epoch, step)
    return job.result({**metrics, "epochs": c.epochs, "steps": step},
                      {"checkpoint": str(job.folder / artifacts.MODEL)})
