"""Process-level plumbing shared by the stages: seeds, devices, atomic checkpoints, DDP."""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path

if TYPE_CHECKING:
    from mcis_cli.config import Config

T = TypeVar("T")
OOM_MARKERS = ("can't allocate memory", "out of memory")  # torch's CPU allocator; CUDA, cuDNN


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise McisError("device 'cuda' requested but no usable GPU was found (use --set device=cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically; a failed write (full disk, ...) is an OSError naming `path`.

    torch.save turns the OSError of a failed write into a RuntimeError of its zip writer; the
    write goes through a Python file so that the OSError, with its errno, is kept as the context.
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)
    except RuntimeError as exc:
        cause = exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load tensors and plain containers only: a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise McisError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise McisError(f"refusing to load {path}: not a plain weights file ({first[:160]})") from None


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: torch reports one as a RuntimeError (CPU) or its
    subclass torch.cuda.OutOfMemoryError, numpy as MemoryError."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS))


def memory_guarded(describe: Callable[[Config], tuple[str, str, str]]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a stage's `run(cfg, ...)`: a failed allocation anywhere in it becomes one McisError
    line naming the stage, the size it ran at and the setting to lower, `describe(cfg)` ->
    (stage, size, setting), instead of a traceback from deep inside torch."""

    def wrap(run: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(run)
        def guarded(cfg: Config, *args: Any, **kwargs: Any) -> T:
            try:
                return run(cfg, *args, **kwargs)
            except (RuntimeError, MemoryError) as exc:
                if not out_of_memory(exc):
                    raise
                stage, size, setting = describe(cfg)
                where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "host"
                raise McisError(f"{stage}: out of {where} memory at {size} (device {cfg.device}); "
                                f"lower {setting}") from None

        return guarded

    return wrap


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


# ---- distributed --------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device_name: str) -> bool:
    """Join the torchrun process group when launched by torchrun; gloo on CPU, nccl on GPU."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=size)
    return True


def data_parallel(module: torch.nn.Module, device: torch.device, **options: Any) -> torch.nn.Module:
    """DDP wrapper; on GPUs BatchNorm becomes SyncBatchNorm, so ranks share batch statistics.
    SyncBatchNorm has no CPU kernel: under gloo each rank normalises with its own batch."""
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index], **options)
    return torch.nn.parallel.DistributedDataParallel(module, **options)


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_zero_first(fetch: Callable[[], T]) -> T:
    """`fetch()` on every rank, rank 0's first: what rank 0 downloads, the others then find in
    the cache, instead of every rank downloading it at once."""
    main = is_main()
    if not main:
        barrier()
    result = fetch()
    if main:
        barrier()
    return result


def broadcast_str(value: str) -> str:
    """Rank 0's string on every rank (run ids, paths)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
