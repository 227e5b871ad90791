"""Fully connected CRF (Krähenbühl & Koltun) over softmax outputs, and a process pool for it.

The MCIS test settings are the defaults of `config.CrfCfg`: Gaussian sxy 3 / compat 1,
bilateral sxy 80 / srgb 4 / compat 3, one mean-field iteration [code eval_res.py]. The official
code feeds the BGR image to the bilateral kernel; we feed RGB. The exact kernel is the same
(colour distances do not depend on the channel order); the permutohedral lattice that
approximates it is not quite order-free, so outputs differ by < 1% of a probability
(tests/test_crf.py measures it).

The CRF is CPU-bound and single-threaded, so images run in parallel worker processes
(`crf_map`): at full size it, not the network, is what evaluation waits for. Images and
probabilities reach the workers through shared memory, and only label maps are pickled back.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
import select
import shutil
import sys
import threading
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np

from mcis_cli.errors import McisError

if TYPE_CHECKING:
    from mcis_cli.config import CrfCfg

EPS = 1e-4  # probability floor of the unary [code eval_res.py]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SHM_PREFIX = "mcis-crf"  # segments are named mcis-crf-<pid>-<random>: whose a leftover is, at a glance
SHM_DIR = "/dev/shm"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
HEAP_KEPT = 1 << 30  # free heap memory a process keeps instead of returning it to the kernel
MMAP_FROM = 32 << 20  # allocations mmap()ed of their own: glibc's own dynamic maximum


def _kernels(params: CrfCfg) -> dict[str, float]:
    """The parameters as a plain dict: cheap to pickle, and workers need not import pydantic."""
    return params.model_dump()


@functools.cache
def keep_heap() -> None:
    """Keep the CRF's freed buffers for the next image (glibc; elsewhere nothing).

    By default free() hands the top of the heap back to the kernel once 2x the mmap threshold
    lies free there, so every image faulted its buffers (about 100 MB at 500 px) in afresh, which
    cost as much as the CRF's own arithmetic. Setting the trim threshold freezes glibc's dynamic
    mmap threshold, so that one is pinned where the dynamic rule would have grown it. Once per
    process (the CLI's, or a pool worker's).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, HEAP_KEPT)
        mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


def _dense_crf(image: np.ndarray, probs: np.ndarray, k: dict[str, float]) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    keep_heap()
    c, h, w = probs.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    probs = probs.astype(np.float32)
    probs = probs / np.maximum(probs.sum(0, keepdims=True), 1e-12)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.maximum(probs, EPS)).reshape(c, -1)))
    crf.addPairwiseGaussian(sxy=k["pos_sxy"], compat=k["pos_compat"])
    crf.addPairwiseBilateral(
        sxy=k["bi_sxy"], srgb=k["bi_srgb"], rgbim=np.ascontiguousarray(image, np.uint8),
        compat=k["bi_compat"],
    )
    return np.asarray(crf.inference(int(k["iters"])), np.float32).reshape(c, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfCfg) -> np.ndarray:
    """Refined (C, H, W) probabilities for an HxWx3 uint8 image and its (C, H, W) softmax."""
    return _dense_crf(image, probs, _kernels(params))


def _task(image: np.ndarray, probs: np.ndarray, k: dict[str, float], argmax: bool) -> np.ndarray:
    q = _dense_crf(image, probs, k)
    return q.argmax(0).astype(np.uint8) if argmax else q


# ---- shared memory: what carries an image and its probabilities to a worker ------------------
@dataclass(frozen=True)
class Slot:
    """Where one image and its probabilities lie in a shared-memory segment: the probabilities as
    float32 first (aligned, and what `_dense_crf` casts them to anyway), then the uint8 image. The
    refined probabilities go back over the first part, so only label maps are ever pickled."""

    name: str
    probs: tuple[int, ...]
    image: tuple[int, ...]

    def views(self, buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
        probs = np.ndarray(self.probs, np.float32, buf)
        return probs, np.ndarray(self.image, np.uint8, buf, offset=probs.nbytes)


def shm_room(need: int, folder: str = SHM_DIR) -> None:
    """Refuse a segment /dev/shm has no room for: writing past a full tmpfs kills the process
    with SIGBUS, not an error (Docker gives containers 64 MB unless told otherwise)."""
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else need
    if free < need:
        raise McisError(f"dense CRF: {folder} has {free / 2**20:.0f} MB free, "
                        f"an image needs {need / 2**20:.0f} MB there; give it more (docker: --shm-size) "
                        "or set evaluate.jobs=1")


class Segments:
    """The shared-memory segments of one `crf_map` call: one per image in flight, reused (their
    pages are touched once) and replaced by a larger one when an image needs more. `close`
    unlinks every one; if the process is killed first, multiprocessing's resource tracker does."""

    def __init__(self) -> None:
        self.free: list[SharedMemory] = []
        self.made: dict[str, SharedMemory] = {}

    def put(self, image: np.ndarray, probs: np.ndarray) -> Slot:
        """Copy (image, probs) into a free segment and say where they lie."""
        shm = self._segment(4 * probs.size + image.size)
        slot = Slot(shm.name, probs.shape, image.shape)
        shared_probs, shared_image = slot.views(shm.buf)
        shared_probs[...], shared_image[...] = probs, image
        return slot

    def _segment(self, need: int) -> SharedMemory:
        """A free segment of at least `need` bytes: one that fits, else a new one in place of a
        free one too small, so there are never more segments than images in flight."""
        fits = [shm for shm in self.free if shm.size >= need]
        if fits:
            self.free.remove(fits[0])
            return fits[0]
        if self.free:
            self._unlink(self.free.pop())
        shm_room(need)
        shm = SharedMemory(f"{SHM_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}", create=True, size=need)
        self.made[shm.name] = shm
        return shm

    def take(self, slot: Slot) -> np.ndarray:
        """The refined probabilities a worker wrote over `slot`'s; frees the segment."""
        q = np.array(slot.views(self.made[slot.name].buf)[0])
        self.release(slot)
        return q

    def release(self, slot: Slot) -> None:
        self.free.append(self.made[slot.name])

    def close(self) -> None:
        for shm in list(self.made.values()):
            self._unlink(shm)

    def _unlink(self, shm: SharedMemory) -> None:
        del self.made[shm.name]
        shm.close()
        shm.unlink()


def _shared_task(slot: Slot, k: dict[str, float], argmax: bool) -> np.ndarray | None:
    """A worker's task: the CRF on the image and probabilities in `slot`; label maps come back
    pickled (H x W bytes), refined probabilities in place (None)."""
    shm = SharedMemory(slot.name)
    try:
        return _in_place(slot, shm.buf, k, argmax)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # no view of the segment outlives its unmapping
        raise
    finally:
        shm.close()


def _in_place(slot: Slot, buf: memoryview, k: dict[str, float], argmax: bool) -> np.ndarray | None:
    probs, image = slot.views(buf)
    q = _task(image, probs, k, argmax)
    if argmax:
        return q
    probs[...] = q
    return None


def _start_worker(parent: int) -> None:
    """Worker initializer: one thread, and an end with the process that started the pool."""
    _single_thread()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _single_thread() -> None:
    """One thread per worker, so `jobs` workers use `jobs` cores.

    pydensecrf is built without OpenMP and numpy ufuncs are serial; this caps any thread pool
    started later, and torch's if the parent's main module brought it in.
    """
    for var in THREAD_VARS:
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _exit_with(pid: int) -> None:
    """End this process when process `pid` ends (Linux >= 5.3; elsewhere, nothing). A worker
    whose parent was killed would wait for tasks for ever, and keep the fork server, the resource
    tracker and so the parent's shared-memory segments alive; once it is gone, the tracker
    unlinks them."""
    try:
        select.select([os.pidfd_open(pid)], [], [])
    except ProcessLookupError:
        pass
    except (AttributeError, OSError):
        return
    os._exit(1)


def _context() -> BaseContext:
    """Workers forked from a fork server that has only numpy and pydensecrf loaded: they start
    without the parent's torch/OpenMP threads, in milliseconds once the server is up (it outlives
    the pool) plus the import of the caller's main module that every worker makes (for the `mcis`
    command, about 0.25 s at the pool's start). Spawn where there is no fork server (Windows)."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__, "pydensecrf.densecrf"])
    return context


_workers: dict[tuple[int, int], ProcessPoolExecutor] = {}  # (pid, jobs): this process's pool


def _pool(jobs: int) -> ProcessPoolExecutor:
    """This process's CRF workers, started by its first `crf_map` and kept for the next ones.

    A pipeline evaluates several runs in one process; starting and stopping the workers for each
    call cost a 48-image call 5 % of its time (more for the `mcis` command, whose main module each
    worker imports). One pool at a time: another `jobs` replaces it. Keyed by pid, so a forked
    child never uses its parent's.
    """
    key = (os.getpid(), jobs)
    if key not in _workers:
        for other in [k for k in _workers if k[0] == key[0]]:
            _workers.pop(other).shutdown(cancel_futures=True)
        _workers[key] = ProcessPoolExecutor(jobs, mp_context=_context(), initializer=_start_worker,
                                            initargs=(os.getpid(),))
    return _workers[key]


def crf_map(
    items: Iterable[tuple[np.ndarray, np.ndarray]], params: CrfCfg, jobs: int = 1,
    argmax: bool = False,
) -> Iterator[np.ndarray]:
    """`dense_crf` over (image, probs) pairs, lazily and in input order, in `jobs` processes.

    At most 2 x jobs images are in flight, so a long split streams through in bounded memory
    and the caller's inference overlaps the CRF. Each goes to its worker through shared memory,
    not a pipe: pickling 21 x H x W probabilities cost more than a worker's share of a core.
    `argmax=True` returns uint8 label maps, which are C x 4 times smaller than probabilities.
    jobs=1 runs in this process.
    """
    k = _kernels(params)
    if jobs <= 1:
        for image, probs in items:
            yield _task(image, probs, k, argmax)
        return
    segments = Segments()
    pool = _pool(jobs)
    pending: deque[tuple[Future, Slot]] = deque()
    try:
        for image, probs in items:
            slot = segments.put(image, probs)
            pending.append((pool.submit(_shared_task, slot, k, argmax), slot))
            if len(pending) >= 2 * jobs:
                yield _collect(*pending.popleft(), segments)
        while pending:
            yield _collect(*pending.popleft(), segments)
    except BrokenProcessPool:
        _workers.pop((os.getpid(), jobs), None)  # a worker died: the next call starts new ones
        raise
    finally:
        for future, _ in pending:
            future.cancel()
        wait([future for future, _ in pending])  # no worker still reads a segment when it is unlinked
        segments.close()


def _collect(future: Future, slot: Slot, segments: Segments) -> np.ndarray:
    """A task's result: its label map, or the refined probabilities it left in the segment."""
    labels = future.result()
    if labels is None:
        return segments.take(slot)
    segments.release(slot)
    return labels
