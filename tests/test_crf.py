"""Dense CRF: it cleans a noisy unary along colour edges, and the process pool changes nothing
and leaves no shared memory behind, whatever happens to it."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from mcis_cli import crf
from mcis_cli.config import CrfCfg
from mcis_cli.crf import crf_map, dense_crf
from mcis_cli.errors import McisError

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)


def _scene(seed: int, size: int = 48, noise: float = 1.5):
    """Piecewise-constant image (three colour regions) and a unary that is right ~45% of the time."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int64)
    labels[:, size // 3 :] = 1
    labels[size // 2 :, size // 2 :] = 2
    image = COLOURS[labels]
    logits = rng.normal(0, noise, (3, size, size))
    logits[labels, *np.indices((size, size))] += 0.6
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32), labels


def test_crf_improves_a_noisy_unary_on_a_piecewise_constant_image():
    image, probs, labels = _scene(0)
    before = (probs.argmax(0) == labels).mean()
    params = CrfCfg(bi_sxy=20, bi_srgb=10, bi_compat=10, iters=5)
    refined = dense_crf(image, probs, params)
    after = (refined.argmax(0) == labels).mean()
    assert before < 0.7 and after > 0.95
    assert refined.shape == probs.shape
    np.testing.assert_allclose(refined.sum(0), 1, atol=1e-4)


def test_official_one_iteration_setting_also_helps():
    image, probs, labels = _scene(1, noise=1.0)
    refined = dense_crf(image, probs, CrfCfg())
    assert (refined.argmax(0) == labels).mean() > (probs.argmax(0) == labels).mean() + 0.1


def test_channel_order_barely_matters():
    """The exact kernel ignores the channel order; the permutohedral lattice approximating it
    does not quite, so RGB (ours) and BGR (official) differ by well under 1% of a probability."""
    image, probs, _ = _scene(2)
    rgb = dense_crf(image, probs, CrfCfg())
    bgr = dense_crf(np.ascontiguousarray(image[..., ::-1]), probs, CrfCfg())
    np.testing.assert_allclose(rgb, bgr, atol=0.02)
    assert (rgb.argmax(0) == bgr.argmax(0)).mean() > 0.99


FAULTS_PER_CALL = """
import resource
import numpy as np
from mcis_cli.config import CrfCfg
from mcis_cli.crf import dense_crf
rng = np.random.default_rng(0)
image = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
probs = rng.random((21, 160, 160)).astype(np.float32)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dense_crf(image, probs, CrfCfg())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's malloc only")
def test_the_crf_reuses_its_freed_buffers_for_the_next_image():
    """Without keep_heap, glibc returned each image's buffers to the kernel and every later call
    faulted as many pages in again (6,839 a call here, against 13,043 for the first)."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], capture_output=True, text=True, check=True)
    first, *later = map(int, out.stdout.split())
    assert first > 1000 and max(later) < first / 10, (first, later)


def test_mismatched_image_is_refused():
    image, probs, _ = _scene(0)
    with pytest.raises(ValueError, match="does not match"):
        dense_crf(image[:-1], probs, CrfCfg())


def _segments(pid: int | None = None) -> list[str]:
    """The shared-memory segments of process `pid` (this one by default) in /dev/shm."""
    return sorted(p.name for p in Path(crf.SHM_DIR).glob(f"{crf.SHM_PREFIX}-{pid or os.getpid()}-*"))


def _grandchildren() -> list[int]:
    """This process's grandchildren: the pool's workers, children of its fork server."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    children = {pid for pid, parent in parents.items() if parent == os.getpid()}
    return [pid for pid, parent in parents.items() if parent in children]


def test_process_pool_equals_inline_and_keeps_order():
    scenes = [_scene(seed, size=24 + 4 * seed)[:2] for seed in range(5)]
    scenes[1] = (scenes[1][0], scenes[1][1].astype(np.float64))  # carried as float32, as the CRF reads it
    inline = list(crf_map(iter(scenes), CrfCfg(), jobs=1))
    pooled = list(crf_map(iter(scenes), CrfCfg(), jobs=2))
    labels = list(crf_map(iter(scenes), CrfCfg(), jobs=2, argmax=True))
    assert len(pooled) == len(scenes)
    for a, b, lab, (image, _) in zip(inline, pooled, labels, scenes, strict=True):
        assert a.shape[1:] == image.shape[:2]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lab, a.argmax(0))
        assert lab.dtype == np.uint8
    assert _segments() == []


def test_segments_are_reused_replaced_when_too_small_and_all_unlinked():
    segments = crf.Segments()
    image, probs, _ = _scene(0, size=16)
    first = segments.put(image, probs)
    assert _segments() == [first.name]
    shared_probs, shared_image = first.views(segments.made[first.name].buf)
    np.testing.assert_array_equal(shared_probs, probs)
    np.testing.assert_array_equal(shared_image, image)
    del shared_probs, shared_image
    segments.release(first)
    assert segments.put(image, probs).name == first.name  # the free one, its pages already there
    big = segments.put(*_scene(1, size=32)[:2])  # none free: a second segment
    assert len(_segments()) == 2
    segments.release(big)
    segments.release(first)
    larger = segments.put(*_scene(2, size=48)[:2])  # neither fits: one is replaced, not added
    assert len(_segments()) == 2 and larger.name in _segments()
    segments.close()
    assert _segments() == []


def test_a_task_refines_in_place_and_a_failing_one_still_lets_go_of_its_segment():
    image, probs, _ = _scene(3, size=20)
    segments = crf.Segments()
    slot = segments.put(image, probs)
    k = CrfCfg().model_dump()
    assert crf._shared_task(slot, k, argmax=False) is None
    np.testing.assert_array_equal(segments.take(slot), dense_crf(image, probs, CrfCfg()))
    slot = segments.put(image, probs)
    assert (crf._shared_task(slot, k, argmax=True) == dense_crf(image, probs, CrfCfg()).argmax(0)).all()
    with pytest.raises(KeyError):  # the worker's own error, the segment closed behind it
        crf._shared_task(slot, {}, argmax=True)
    segments.close()
    assert _segments() == []


def test_an_error_in_a_worker_reaches_the_caller_and_leaves_no_segment():
    scenes = [_scene(seed, size=24)[:2] for seed in range(6)]
    scenes[3] = (scenes[3][0][:-1], scenes[3][1])
    with pytest.raises(ValueError, match="does not match"):
        list(crf_map(iter(scenes), CrfCfg(), jobs=2))
    assert _segments() == []


def test_a_caller_that_stops_early_leaves_no_segment():
    refined = crf_map(iter([_scene(seed, size=24)[:2] for seed in range(6)]), CrfCfg(), jobs=2)
    next(refined)
    assert _segments()
    refined.close()
    assert _segments() == []


def test_a_killed_worker_stops_the_map_and_leaves_no_segment():
    scenes = [_scene(seed, size=32)[:2] for seed in range(12)]
    with pytest.raises(BrokenProcessPool):
        for n, _ in enumerate(crf_map(iter(scenes), CrfCfg(), jobs=2, argmax=True)):
            if n == 0:
                os.kill(_grandchildren()[0], signal.SIGKILL)
                time.sleep(0.5)  # the pool notices before the next image is sent
    assert _segments() == []


KILLED_PARENT = """
import os, signal, sys
import numpy as np
from mcis_cli.config import CrfCfg
from mcis_cli.crf import crf_map
if __name__ == "__main__":
    rng = np.random.default_rng(0)
    scenes = [(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.random((3, 64, 64), np.float32))
              for _ in range(8)]
    for n, _ in enumerate(crf_map(iter(scenes), CrfCfg(), jobs=2)):
        if n == 1:
            print(os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_parent_s_segments_are_unlinked_once_its_workers_follow_it(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_PARENT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _segments(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _segments(pid) == []


def test_shm_room_refuses_a_segment_that_does_not_fit(tmp_path):
    crf.shm_room(1, str(tmp_path))
    crf.shm_room(10**18, str(tmp_path / "absent"))  # no such folder (not Linux): nothing to check
    with pytest.raises(McisError, match="evaluate.jobs=1"):
        crf.shm_room(10**18, str(tmp_path))
