"""torchrun's processes: joining the group, splitting work over the ranks, waiting and merging.

Only the engine and the training skeleton call this module; a stage never sees a rank.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from mcis_cli.errors import McisError

T = TypeVar("T")
TIMEOUT_ENV = "MCIS_DIST_TIMEOUT"  # seconds a rank waits for the others (a machine's setting, not a run's)
DEFAULT_TIMEOUT = 1800.0  # torch's own default for gloo


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    """Whether this process is one rank of a joined torchrun group."""
    return dist.is_available() and dist.is_initialized()


def cpus_per_rank() -> int:
    """This machine's cores shared out among the ranks it runs (torchrun's LOCAL_WORLD_SIZE)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


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


def init(device_name: str) -> bool:
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
    atexit.register(leave)
    return True


def leave() -> None:
    """Destroy the process group while the interpreter is still whole: left to its teardown,
    gloo's worker threads can abort a rank whose work is done (SIGABRT, "terminate called
    without an active exception")."""
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
    if active():
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
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- sharded work: split, wait, merge -------------------------------------------------------
def shard(items: Sequence[T], weights: Sequence[float] | None = None) -> list[T]:
    """This rank's share of `items`, in list order: heaviest first to the least loaded rank (ties
    to the earlier item, the lower rank). Every rank computes the same split of the same list, so
    the shares cover it once, whatever the number of ranks."""
    rank, size = world() if active() else (0, 1)
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
    if not active():
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def gather(values: list[T]) -> list[T]:
    """Every rank's list of picklable `values`, concatenated in rank order, on every rank."""
    if not active():
        return values
    parts: list[list[T]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


_SETTLED = [0]  # how many `settle` calls this process has made: each waits on keys of its own


def settle(stage: str) -> None:
    """Wait until every rank has done its share: a rank that is gone (killed, crashed) stops the
    others in one line naming it and the command to start again, after MCIS_DIST_TIMEOUT."""
    if not active():
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
