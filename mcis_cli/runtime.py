"""Process-level plumbing shared by the stages: seeds, devices, atomic checkpoints, DDP."""

from __future__ import annotations

import atexit
import functools
import os
import random
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path

if TYPE_CHECKING:
    from mcis_cli.config import Config
    from mcis_cli.tracking import Tracker

T = TypeVar("T")
OOM_MARKERS = ("can't allocate memory", "out of memory")  # torch's CPU allocator; CUDA, cuDNN
TIMEOUT_ENV = "MCIS_DIST_TIMEOUT"  # seconds a rank waits for the others (a machine's setting, not a run's)
DEFAULT_TIMEOUT = 1800.0  # torch's own default for gloo


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


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_timeout() -> float:
    """How long a rank waits for the others (MCIS_DIST_TIMEOUT, seconds)."""
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise McisError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {os.environ[TIMEOUT_ENV]!r}")
    return seconds


_STORE: list[Any] = []  # the rendezvous store of this process's group, for `settle`


def init_distributed(device_name: str) -> bool:
    """Join the torchrun process group when launched by torchrun; gloo on CPU, nccl on GPU.
    Every collective gives up after MCIS_DIST_TIMEOUT seconds, so a rank that is gone never
    leaves the others waiting for ever; the store is kept for `settle`."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=dist_timeout())
    store, rank, size = next(dist.rendezvous("env://", rank, size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=size,
                            timeout=timeout)
    _STORE[:] = [store]
    atexit.register(leave_distributed)
    return True


def leave_distributed() -> None:
    """Destroy the process group while the interpreter is still whole: left to its teardown,
    gloo's worker threads can abort a rank whose work is done (SIGABRT, "terminate called
    without an active exception", seen at the end of torchrun runs here)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _STORE.clear()


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
    if distributed():
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


def broadcast(value: T) -> T:
    """Rank 0's value (run ids, paths, small picklable objects) on every rank."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def open_run(cfg: Config, stage: str, **options: Any) -> Iterator[tuple[Tracker | None, str]]:
    """(tracker, run id): rank 0 opens the stage's run (`tracking.stage_run` with `options`), the
    other ranks get None and rank 0's run id."""
    from mcis_cli import tracking

    main = is_main()
    with (tracking.stage_run(cfg, stage, **options) if main else nullcontext()) as tracker:
        yield tracker, broadcast(tracker.run_id if main else "")


# ---- sharded work: split, wait, merge -------------------------------------------------------
def shard(items: Sequence[T], weights: Sequence[float] | None = None) -> list[T]:
    """This rank's share of `items`, in list order: heaviest first to the least loaded rank (ties
    to the earlier item, the lower rank). Every rank computes the same split of the same list, so
    the shares cover it once, whatever the number of ranks."""
    rank, size = world() if distributed() else (0, 1)
    if size == 1:
        return list(items)
    weights = [1.0] * len(items) if weights is None else weights
    load = [0.0] * size
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-weights[i], i)):
        owner[i] = min(range(size), key=lambda r: (load[r], r))
        load[owner[i]] += weights[i]
    return [item for item, r in zip(items, owner, strict=True) if r == rank]


def all_sum(array: np.ndarray) -> np.ndarray:
    """`array` summed over the ranks (int64 counts stay exact), on every rank."""
    if not distributed():
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def gather(values: list[T]) -> list[T]:
    """Every rank's list of picklable `values`, concatenated in rank order, on every rank."""
    if not distributed():
        return values
    parts: list[list[T]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


_SETTLED = [0]  # how many `settle` calls this process has made: each waits on keys of its own


def settle(stage: str) -> None:
    """Wait until every rank has done its share: a rank that is gone (killed, crashed) stops the
    others in one line naming it and the command to start again, after MCIS_DIST_TIMEOUT."""
    if not distributed():
        return
    rank, size = dist.get_rank(), dist.get_world_size()
    _SETTLED[0] += 1
    keys = [f"mcis/settle/{_SETTLED[0]}/{r}" for r in range(size)]
    store = _STORE[0]
    try:
        store.set(keys[rank], "done")
        store.wait(keys)
        return
    except RuntimeError:  # the store's timeout, or its host (rank 0 or torchrun) is gone
        pass
    try:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
    except RuntimeError:
        missing = [0]
    command = shlex.join(["mcis", *sys.argv[1:]])
    ranks = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
    raise McisError(f"{stage}: {ranks} of {size} stopped before its share was "
                    f"done (waited up to {dist_timeout():.0f} s, {TIMEOUT_ENV}); every file written is "
                    f"complete: start `{command}` again, alone or under torchrun with any number of "
                    "processes") from None
