"""The training skeleton of classify and segment, split as torchvision's reference scripts split
`main` from `train_one_epoch`: each stage keeps its data, its schedule and its loop; what every
loop does the same way is written here once.

- the learning rate of the schedule, set on each param group times its `lr_mult`;
- a step: the loss terms averaged over the ranks and checked *before* the update, so that a
  non-finite loss stops the run in one line (the stage, the step, the last good checkpoint)
  and its update is never applied; then the AMP-scaled backward and optimizer step;
- the resume state: model, optimizer, GradScaler, every rank's RNG state and the stage's progress
  counters, so that a resumed run continues bit-exactly.

Only rank 0 holds the MLflow run (the engine's `job.log`) and writes files; the other ranks have
no tracker (None). The rank-0 guards of a step's metrics and of a file's writing and upload are
here, so the stages' loops never ask which rank they run on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from mcis_cli import distributed, tracking
from mcis_cli.checkpoints import load_checkpoint, save_checkpoint
from mcis_cli.config import SpeedCfg
from mcis_cli.devices import derived_seed, rng_state, set_rng_state
from mcis_cli.errors import McisError
from mcis_cli.progress import console, training_progress

if TYPE_CHECKING:
    from mcis_cli.config import ClassifyCfg, Config, OaaTrainCfg


def check_split(stage: str, batch_size: int) -> None:
    """The global batch must split evenly over torchrun's processes."""
    world = distributed.world()[1]
    if batch_size % world:
        raise McisError(f"{stage}.batch_size {batch_size} does not split over {world} processes; "
                        f"make it a multiple of {world}")


def step_decay(c: ClassifyCfg | OaaTrainCfg, epoch: int) -> float:
    """The official step schedule of classify, accumulate and integral: lr x decay_factor at each
    decay epoch reached."""
    return c.lr * c.decay_factor ** sum(epoch >= e for e in c.decay_epochs)


def optimizer(model: nn.Module, c: ClassifyCfg | OaaTrainCfg) -> torch.optim.Optimizer:
    """SGD (official: Nesterov momentum) or AdamW over the four lr-multiplier groups of `model`
    (`param_groups`: its backbone's weights and biases, then the new layers')."""
    from mcis_cli.models.mcis import param_groups

    groups = param_groups(model, c.lr, c.lr_mult)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)


def loader_options(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The DataLoader options both stages share: the worker count and pinned memory on a GPU."""
    return {"num_workers": cfg.data.workers, "pin_memory": device.type == "cuda"}


class Trainer:
    """One process's model, optimizer and GradScaler, and the last good checkpoint (named when
    the loss turns non-finite). The model is the bare one: `parallel` wraps what a step calls."""

    def __init__(self, stage: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool, log_every: int, speed: SpeedCfg | None = None):
        speed = speed or SpeedCfg()
        self.stage, self.model, self.optimizer, self.device = stage, model, optimizer, device
        self.dtype = torch.bfloat16 if speed.amp_dtype == "bf16" else torch.float16
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.dtype == torch.float16)  # bf16 needs none
        self.compile = speed.compile
        if speed.channels_last:
            model.to(memory_format=torch.channels_last)  # the outputs of its convolutions follow
        self.log_every = log_every
        self.distributed = distributed.active()
        self.main = distributed.is_main()
        self.share = distributed.world()  # (this process's part, the number of parts) of each batch
        self.last_good: Path | None = None
        self._bar = training_progress()
        self._bar.disable = not self.main
        self._task = None
        if amp and not self.amp and self.main:
            console.print(f"[yellow]warning:[/] {stage}.amp needs CUDA; training in fp32")

    def seed_streams(self, seed: int, *values: int) -> None:
        """Seed this process's own random stream (dropout) from `seed`, its part and `values`."""
        torch.manual_seed(derived_seed(seed, self.share[0], *values))

    def parallel(self, module: nn.Module, **options: Any) -> nn.Module:
        """What a step calls: `module` under DDP when the ranks train together, compiled when
        `speed.compile` asks (the module's own parameters stay the ones saved)."""
        module = distributed.data_parallel(module, self.device, **options) if self.distributed else module
        return torch.compile(module) if self.compile else module

    def autocast(self):
        """The mixed precision of the forward (a no-op without AMP)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp)

    def set_lr(self, lr: float) -> None:
        """The schedule's rate on every param group, times the group's multiplier."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]

    def step(self, total: torch.Tensor, parts: dict[str, torch.Tensor], where: str) -> dict[str, float]:
        """Update from the loss `total` of the forward (its `parts` are logged): returns
        {"total", *parts} averaged over the ranks. A non-finite one stops before the update, in
        a McisError naming the step (`where`) and the last good checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.backward(total, parts, where)
        self.apply()
        return terms

    def backward(self, total: torch.Tensor, parts: dict[str, torch.Tensor], where: str) -> dict[str, float]:
        """`step` without the update: the gradients of `total` add to those already there (OAA's
        iter_size); `apply` makes the update."""
        values = torch.stack([total.detach().float(), *(p.detach().float() for p in parts.values())])
        if self.distributed:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        terms = dict(zip(["total", *parts], values.tolist(), strict=True))
        if not all(math.isfinite(v) for v in terms.values()):
            raise McisError(
                f"{self.stage}: non-finite loss {terms}; loss is {terms['total']} at {where}; last good "
                f"checkpoint: {self.last_good or 'none yet'}; lower {self.stage}.lr in a new run, or "
                "check the data"
            )
        self.scaler.scale(total).backward()
        return terms

    def apply(self) -> None:
        """The optimizer step on the gradients gathered since the last one, which it then clears."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def progress(self, total: int, done: int, lr: float) -> Iterator[None]:
        """Rank 0's progress bar over `total` steps, `done` of them already; `log_step` advances it."""
        with self._bar:
            self._task = self._bar.add_task(self.stage, total=total, completed=done, loss=float("nan"), lr=lr)
            yield

    def log_step(self, tracker: tracking.Tracker | None, step: int, lr: float, loss: float,
                 metrics: dict[str, float]) -> None:
        """After step `step`: rank 0 logs the lr and `metrics` every `log_every` steps; the bar advances."""
        if tracker is not None and step % self.log_every == 0:
            tracker.log_metrics({"lr": lr, **metrics}, step=step)
        self._bar.update(self._task, advance=1, loss=loss, lr=lr)

    # ---- checkpoints ----------------------------------------------------------------------
    def state(self, **progress: int) -> dict[str, Any]:
        """The resume state, with every rank's RNG state (dropout) gathered: all ranks call it."""
        if self.distributed:
            rng = [None] * dist.get_world_size()
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, **progress}

    def restore(self, state: dict[str, Any], other_world: Callable[[dict[str, Any]], None]) -> None:
        """Continue from a `state`: each rank takes its own RNG state back; saved by another
        number of ranks, `other_world(state)` sets this rank's RNG (the stage's choice)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rank, size = distributed.world()
        if len(state["rng"]) == size:
            set_rng_state(state["rng"][rank])
        else:
            other_world(state)

    def resume(self, path: Path | None, other_world: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Continue from the resume state at `path` (the engine's `job.resume_file(LAST)`): the
        state, or None when there is none (a new run, or one killed before its first checkpoint)."""
        if path is None:
            return None
        state = load_checkpoint(path)
        self.restore(state, other_world)
        self.last_good = path
        return state

    def write(self, path: Path, content: dict[str, Any], tracker: tracking.Tracker | None = None) -> None:
        """Rank 0 writes `content` to `path` atomically and, given the tracker, uploads it to the
        artifact folder named as its local folder (checkpoints/); the other ranks write nothing."""
        if self.main:
            save_checkpoint(path, content)
            if tracker is not None:
                tracker.log_artifact(path, path.parent.name)

    def save(self, path: Path, tracker: tracking.Tracker | None, **progress: int) -> None:
        """Checkpoint the resume state with the stage's `progress` counters (every rank calls it);
        once rank 0 has written and uploaded it, it is the last good checkpoint."""
        self.write(path, self.state(**progress), tracker)
        self.last_good = path
        distributed.barrier()
