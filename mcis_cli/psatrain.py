"""What PSA's two trainings share (train_cls.py and train_aff.py are one loop with another model
and loss): random crops, epoch batches, the PolyOptimizer schedule and the epoch loop on the
project's `training.Trainer` (checkpoints, resume state, progress, loss and lr logging).

Every random choice (order, scale, crop, flip, jitter) follows from (seed, epoch, index), so a
resumed run and a torchrun run see exactly the data of one uninterrupted process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcis_cli import artifacts, engine, psa, training
from mcis_cli.config import PsaTraining, SpeedCfg
from mcis_cli.data import voc
from mcis_cli.devices import set_rng_state
from mcis_cli.errors import McisError
from mcis_cli.models.psa import optimizer, param_groups

Recipe = PsaTraining


def crop_window(size: tuple[int, int], crop: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A random crop x crop window of an (h, w) image (imutils.py:27-60): (top, left) in the image
    and (top, left) in the crop where it lands; a side shorter than the crop sits at a random
    offset in the canvas."""
    (h, w), out = size, []
    for side in (h, w):
        spare = side - crop
        out.append((rng.randint(0, spare), 0) if spare >= 0 else (0, rng.randint(0, -spare)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def crop(array: np.ndarray, window: tuple[int, int, int, int], size: int, fill: Any) -> np.ndarray:
    """(H, W, ...) -> (size, size, ...) of `window`, the rest `fill`."""
    top, left, ctop, cleft = window
    part = array[top : top + size, left : left + size]
    canvas = np.empty((size, size, *array.shape[2:]), array.dtype)
    canvas[...] = fill
    canvas[ctop : ctop + part.shape[0], cleft : cleft + part.shape[1]] = part
    return canvas


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


class EpochData(Dataset):
    """A training set of `samples` whose items depend on the epoch (`set_epoch` before each), drawn
    from `rng(index)`, a generator of (kind, seed, epoch, index)."""

    def __init__(self, kind: str, samples: list[voc.Sample], c: Recipe, seed: int):
        self.kind, self.samples, self.c, self.seed, self.epoch = kind, samples, c, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.kind}:{self.seed}:{self.epoch}:{index}")  # str seeds are stable


def epoch_batches(n: int, seed: int, epoch: int, batch_size: int, part: int, parts: int) -> list[list[int]]:
    """Part `part` of `parts` of every full global batch of a shuffled epoch (drop_last, as the
    official loaders)."""
    order = list(range(n))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    batches = [order[s : s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
    return [b[part::parts] for b in batches]


def build_optimizer(model: nn.Module, c: Recipe) -> torch.optim.Optimizer:
    """The official four groups and SGD (momentum bug by `c.momentum_bug`), or AdamW (the toy's)."""
    groups = param_groups(model, c.weight_decay, c.lr_mult)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr)
    return optimizer(groups, c.lr, c.weight_decay, c.momentum_bug)


def trainer(stage: str, model: nn.Module, c: Recipe, speed: SpeedCfg, device: torch.device) -> training.Trainer:
    """The training skeleton around `model`, its ImageNet convolutions loaded when `c.pretrained`."""
    if c.pretrained:
        model.backbone.load_imagenet()
    model.to(device)
    return training.Trainer(stage, model, build_optimizer(model, c), device, c.amp, c.log_every, speed)


def check_pretrained(section: str, c: Recipe) -> None:
    if c.pretrained and c.width != 1.0:
        raise McisError(f"{section}.pretrained needs {section}.width=1 (got {c.width}): ImageNet VGG16 "
                        f"weights exist only at full width; set {section}.pretrained=false")


def _first_process_rng(state: dict[str, Any]) -> None:
    set_rng_state(state["rng"][0])


def train(job: engine.Job, trainer: training.Trainer, data: EpochData, c: Recipe,
          step_loss: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
          model_file: Callable[[], dict[str, Any]]) -> dict[str, float]:
    """Epochs of poly-scheduled steps (lr (1 - step/max)^power before each, torchutils.py:24-28),
    the resume state after each epoch, the model file at the end; returns the last epoch's mean
    loss and the step count."""
    parts = trainer.share
    per_epoch = len(epoch_batches(len(data), job.cfg.seed, 0, c.batch_size, *parts))
    if not per_epoch:
        raise McisError(f"{trainer.stage}: {len(data)} training images make no batch of {c.batch_size}")
    max_step = per_epoch * c.epochs
    state = trainer.resume(job.resume_file(artifacts.LAST), _first_process_rng)
    first, step = (state["epoch"] + 1, state["global_step"]) if state else (0, 0)
    loss = float("nan")
    with trainer.progress(max_step, step, c.lr):
        for epoch in range(first, c.epochs):
            data.set_epoch(epoch)
            batches = epoch_batches(len(data), job.cfg.seed, epoch, c.batch_size, *parts)
            loader = DataLoader(data, batch_sampler=batches, **training.loader_options(job.cfg, trainer.device))
            trainer.model.train()
            totals = []
            for batch in loader:
                lr = psa.poly_lr(c.lr, step, max_step, c.poly_power)
                trainer.set_lr(lr)
                batch = {k: v.to(trainer.device, non_blocking=True) for k, v in batch.items()}
                with trainer.autocast():
                    total, terms = step_loss(batch)
                done = trainer.step(total, terms, f"step {step} (epoch {epoch})")
                trainer.log_step(job.log, step, lr, done["total"], {f"loss/{k}": v for k, v in done.items()})
                totals.append(done["total"])
                step += 1
            loss = float(np.mean(totals))
            job.report(lambda log, e=epoch, v=loss: log.log_metrics({"train/loss": v}, step=e))
            trainer.save(job.folder / artifacts.LAST, job.log, epoch=epoch, global_step=step)
    trainer.write(job.folder / artifacts.MODEL, model_file(), job.log)
    return {"train/loss": loss, "steps": float(step), "epochs": float(c.epochs)}

