"""Seeds, random-number state and devices of one process."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from mcis_cli.errors import McisError

if TYPE_CHECKING:
    from mcis_cli.config import SpeedCfg

OOM_MARKERS = ("can't allocate memory", "out of memory")  # torch's CPU allocator; CUDA, cuDNN


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def configure_speed(speed: SpeedCfg, deterministic: bool) -> None:
    """This process's GPU kernel choices: cuDNN's per-shape algorithm search (its timing picks
    differ from run to run, so never in deterministic mode), and TensorFloat-32 for matmuls as
    for convolutions. cuDNN convolutions keep PyTorch's default (TF32): forcing them to IEEE
    also changes how the CPU export traces convolutions, and ONNX export then fails."""
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark and not deterministic
    torch.backends.cuda.matmul.fp32_precision = "tf32" if speed.tf32 else "ieee"


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise McisError("device 'cuda' requested but no usable GPU was found (use --set device=cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: torch reports one as a RuntimeError (CPU) or its
    subclass torch.cuda.OutOfMemoryError, numpy as MemoryError."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(*values: int) -> int:
    """One well-spread 32-bit seed from a few integers (seed, epoch, index, rank, ...): each
    random choice that has its own seed stays the same however the work is split or resumed."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])
