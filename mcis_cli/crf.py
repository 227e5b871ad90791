"""Fully connected CRF (Krähenbühl & Koltun) over softmax outputs, and a process pool for it.

The MCIS test settings are the defaults of `config.CrfCfg`: Gaussian sxy 3 / compat 1,
bilateral sxy 80 / srgb 4 / compat 3, one mean-field iteration [code eval_res.py]. The official
code feeds the BGR image to the bilateral kernel; we feed RGB. The exact kernel is the same
(colour distances do not depend on the channel order); the permutohedral lattice that
approximates it is not quite order-free, so outputs differ by < 1% of a probability
(tests/test_crf.py measures it).

The CRF is CPU-bound and single-threaded, so images run in parallel worker processes
(`crf_map`): at full size it, not the network, is what evaluation waits for.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mcis_cli.config import CrfCfg

EPS = 1e-4  # probability floor of the unary [code eval_res.py]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _kernels(params: CrfCfg) -> dict[str, float]:
    """The parameters as a plain dict: cheap to pickle, and workers need not import pydantic."""
    return params.model_dump()


def _dense_crf(image: np.ndarray, probs: np.ndarray, k: dict[str, float]) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

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


def _single_thread() -> None:
    """Worker initializer: one thread each, so `jobs` workers use `jobs` cores.

    pydensecrf is built without OpenMP and numpy ufuncs are serial; this caps any thread pool
    started later, and torch's if the parent's main module brought it in.
    """
    for var in THREAD_VARS:
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _context() -> BaseContext:
    """Workers forked from a fork server that has only numpy and pydensecrf loaded: they start in
    milliseconds once the server is up (it outlives the pool), inherit none of the parent's
    torch/OpenMP threads, and never re-import the caller's main module as spawned workers do. Spawn where there is no fork server (Windows)."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload([__name__, "pydensecrf.densecrf"])
    return context


def crf_map(
    items: Iterable[tuple[np.ndarray, np.ndarray]], params: CrfCfg, jobs: int = 1,
    argmax: bool = False,
) -> Iterator[np.ndarray]:
    """`dense_crf` over (image, probs) pairs, lazily and in input order, in `jobs` processes.

    At most 2 x jobs images are in flight, so a long split streams through in bounded memory
    and the caller's inference overlaps the CRF. `argmax=True` returns uint8 label maps, which
    are C x 4 times cheaper to send back than probabilities. jobs=1 runs in this process.
    """
    k = _kernels(params)
    if jobs <= 1:
        for image, probs in items:
            yield _task(image, probs, k, argmax)
        return
    with ProcessPoolExecutor(jobs, mp_context=_context(), initializer=_single_thread) as pool:
        pending = deque()
        for image, probs in items:
            pending.append(pool.submit(_task, image, probs, k, argmax))
            if len(pending) >= 2 * jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
