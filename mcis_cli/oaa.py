"""What OAA's two stages share (docs/method.md "OAA and OAA+"): the data (single images, short
side resized, no flip, in list order), the OAA network's training loop with iter_size, the store of
cumulative attention maps and the bicubic resize of 8-bit maps.

`accumulate` writes the store while it trains the classifier; `integral` reads it as its targets.
Every random choice (colour jitter) follows from (seed, epoch, image), so a resumed run sees the
data of an uninterrupted one.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mcis_cli import artifacts, engine, training
from mcis_cli.config import Config, OaaTrainCfg
from mcis_cli.data import transforms, voc
from mcis_cli.devices import set_rng_state
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import load_imagenet
from mcis_cli.models.oaa import OAANet
from mcis_cli.tracking import Tracker

STRIDE = 8  # the network's output stride: maps are (H // 8, W // 8) of the resized input


# ---- data ------------------------------------------------------------------------------------
def short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(h, w) after ResizeShort(short): the short side becomes `short`, the long one keeps the
    aspect ratio, truncated to an integer (OAA-PyTorch utils/imutils.py:24-39)."""
    h, w = size
    if h <= w:
        return short, int(w * short / h)
    return int(h * short / w), short


def feature_size(size: tuple[int, int]) -> tuple[int, int]:
    """The class maps' (h, w) for an input of `size`: three 2x2/2 pools, each rounding down."""
    return size[0] // STRIDE, size[1] // STRIDE


class OaaDataset(Dataset):
    """Item i: training image i resized by its short side (bicubic), colour-jittered, its labels and
    its index; `target(i, shape)` (integral's) adds the target maps. Call `set_epoch` first."""

    def __init__(self, samples: Sequence[voc.Sample], num_classes: int, c: OaaTrainCfg, seed: int,
                 jitter: bool = True, target: Callable[[int, tuple[int, int]], torch.Tensor] | None = None):
        self.samples, self.num_classes, self.seed, self.size = samples, num_classes, seed, c.input_size
        self.jitter = c.color_jitter if jitter else [0.0] * 4
        self.target, self.epoch = target, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The un-jittered network input of image `index` (HxWx3 uint8)."""
        image = transforms.load_image(self.samples[index].image)
        return transforms.resize(image, short_side_size(image.shape[:2], self.size), "bicubic")

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.image(index)
        if any(self.jitter):
            rng = random.Random(f"oaa-jitter:{self.seed}:{self.epoch}:{index}")  # str seeds are stable
            image = transforms.color_jitter(image, self.jitter, rng)
        y = torch.zeros(self.num_classes)
        y[list(self.samples[index].labels)] = 1.0
        item = {"x": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), "y": y, "index": index}
        if self.target is not None:
            item["q"] = self.target(index, feature_size(image.shape[:2]))
        return item


def check_batchable(samples: Sequence[voc.Sample], c: OaaTrainCfg, stage: str) -> None:
    """A batch of more than one image needs one input shape: the official batch is 1 (VOC's
    images differ in aspect ratio); the embedded data's square images can be batched."""
    if c.batch_size == 1:
        return
    shapes = {short_side_size(transforms.image_size(s.image), c.input_size) for s in samples}
    if len(shapes) > 1:
        raise McisError(f"{stage}.batch_size={c.batch_size} needs training images of one shape after the "
                        f"short-side resize, found {len(shapes)}; set {stage}.batch_size=1 (the official "
                        f"value, with {stage}.iter_size for the effective batch)")


# ---- training --------------------------------------------------------------------------------
def check_pretrained(c: OaaTrainCfg, stage: str) -> None:
    if c.pretrained and c.width != 1.0:
        raise McisError(f"{stage}.pretrained needs {stage}.width=1 (got {c.width}): ImageNet VGG16 weights "
                        f"exist only at full width; set {stage}.pretrained=false to train from scratch")


Loss = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]  # (maps (B, K, h, w), batch) -> the forward's loss
Seen = Callable[[torch.Tensor, dict[str, Any], int], None]  # (detached maps, batch, epoch) after a forward


class OaaTrainer(training.Trainer):
    """The OAA network and its SGD with iter_size: the gradients of `iter_size` forwards make one
    step, and (official, `carry_partial_step`) an epoch's incomplete last step is carried into
    the next epoch's first one. Runs in one process (the stages are `one_process`)."""

    def __init__(self, stage: str, cfg: Config, c: OaaTrainCfg, num_classes: int, device: torch.device,
                 divide_by_iter_size: bool):
        self.c, self.divide = c, divide_by_iter_size
        model = OAANet(num_classes, c.width, c.batch_norm, c.blocks)
        if c.pretrained:
            load_imagenet(model.backbone, c.batch_norm)
        model.to(device)
        super().__init__(stage, model, training.optimizer(model, c), device, c.amp, c.log_every, cfg.speed)

    def steps_per_epoch(self, images: int) -> int:
        return (-(-images // self.c.batch_size)) // self.c.iter_size

    def train_epoch(self, loader: DataLoader, epoch: int, step: int, tracker: Tracker | None, loss: Loss,
                    seen: Seen | None = None) -> tuple[int, float]:
        """One epoch at its lr from global step `step`: returns (next step, mean loss per forward)."""
        lr = training.step_decay(self.c, epoch)
        self.set_lr(lr)
        self.model.train()
        forwards, losses = 0, []
        for batch in loader:
            x = transforms.normalize(batch["x"].to(self.device))
            with self.autocast():
                maps = self.model(x)
            total = loss(maps.float(), batch)
            if seen is not None:
                seen(maps.detach().float(), batch, epoch)
            scaled = total / self.c.iter_size if self.divide else total
            losses.append(self.backward(scaled, {"loss": total}, f"forward {forwards} of epoch {epoch}")["loss"])
            forwards += 1
            if forwards % self.c.iter_size == 0:
                self.apply()
                mean = float(np.mean(losses[-self.c.iter_size:]))
                self.log_step(tracker, step, lr, mean, {"loss/total": mean})
                step += 1
        if forwards % self.c.iter_size and not self.c.carry_partial_step:
            self.optimizer.zero_grad(set_to_none=True)
        return step, float(np.mean(losses)) if losses else float("nan")

    def carried(self) -> list[torch.Tensor | None]:
        """The gradients an epoch leaves for the next one (part of the resume state)."""
        return [p.grad for p in self.model.parameters()]

    def restore_carried(self, grads: list[torch.Tensor | None]) -> None:
        for p, g in zip(self.model.parameters(), grads, strict=True):
            p.grad = None if g is None else g.to(p.device)


def loader(dataset: OaaDataset, cfg: Config, c: OaaTrainCfg, device: torch.device) -> DataLoader:
    """The official order: the list's, unshuffled (LoadData.py:38)."""
    return DataLoader(dataset, batch_size=c.batch_size, shuffle=False, **training.loader_options(cfg, device))


def fit(job: engine.Job, trainer: OaaTrainer, c: OaaTrainCfg, dataset: OaaDataset, loss: Loss, *,
        seen: Seen | None = None, kept: Callable[[], dict[str, Any]] = dict,
        restore: Callable[[dict[str, Any] | None], None] = lambda state: None,
        metrics: Callable[[], dict[str, float]] = dict) -> int:
    """Train (or continue) for `c.epochs`: the resume state after each epoch holds the carried
    gradients and what `kept()` returns (accumulate's store), which `restore(state)` takes back
    (None for a new run); `metrics()` are logged per epoch beside the mean loss. Returns the
    global step."""
    state = trainer.resume(job.resume_file(artifacts.LAST), lambda s: set_rng_state(s["rng"][0]))
    restore(state)
    first_epoch, step = 0, 0
    if state:
        trainer.restore_carried(state["grads"])
        first_epoch, step = state["epoch"] + 1, state["global_step"]
    per_epoch = trainer.steps_per_epoch(len(dataset))
    with trainer.progress(c.epochs * per_epoch, first_epoch * per_epoch, c.lr):
        for epoch in range(first_epoch, c.epochs):
            dataset.set_epoch(epoch)
            step, mean = trainer.train_epoch(loader(dataset, job.cfg, c, job.device), epoch, step, job.log, loss, seen)
            job.report(lambda log, m=mean, e=epoch: log.log_metrics({"train/loss": m, **metrics()}, step=e))
            trainer.save(job.folder / artifacts.LAST, job.log, epoch=epoch, global_step=step,
                         grads=trainer.carried(), **kept())
    return step


# ---- the store of cumulative maps ------------------------------------------------------------
class AttentionStore:
    """Each training image's cumulative maps, one file `<id>.npz` a image in a folder: `maps`
    uint8 (n, h, w) at feature resolution for its n GT classes (label order) and `stored` (n,),
    whether each class has a map yet. Keyed by image id, so any loader order gives the same store;
    on disk, so memory holds one image's maps at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.npz"

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(maps, stored) of an image, or None before anything was stored for it."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        with np.load(path) as data:
            return data["maps"], data["stored"]

    def put(self, image_id: str, maps: np.ndarray, stored: np.ndarray) -> None:
        """Written in place, without the fsync of an atomic write (a step's worth of time on a GPU):
        a resumed run replaces the whole store by its checkpoint's (`restore`), torn files included."""
        with open(self.path(image_id), "wb") as handle:
            np.savez(handle, maps=maps.astype(np.uint8), stored=stored.astype(bool))

    def snapshot(self) -> dict[str, bytes]:
        """Every file's bytes, for the resume state: the store as it was at the checkpoint."""
        return {p.name: p.read_bytes() for p in sorted(self.folder.glob("*.npz"))}

    def restore(self, snapshot: dict[str, bytes]) -> None:
        """The store of a checkpoint, replacing whatever a killed start wrote after it."""
        shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        for name, content in snapshot.items():  # a kill meanwhile: the next start restores again
            (self.folder / name).write_bytes(content)

    def planes(self, image_id: str, n: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(maps, stored) of an image, all 0 / False for what was never stored."""
        found = self.get(image_id)
        return found if found is not None else (np.zeros((n, *shape), np.uint8), np.zeros(n, bool))


def bicubic_uint8(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (n, h, w) -> uint8 (n, H, W), bicubic (a = -0.75, half-pixel centres, edges
    replicated: cv2.resize INTER_CUBIC's kernel), rounded and saturated as cv2 writes uint8.
    cv2 computes in fixed point, so a value may differ from it by one grey level."""
    if planes.shape[0] == 0:
        return np.zeros((0, *size), np.uint8)
    x = torch.from_numpy(planes.astype(np.float32))[None]
    out = F.interpolate(x, size=size, mode="bicubic", align_corners=False)[0]
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)  # numpy: torch's round is slow on a CPU
