"""Dense CRF: it cleans a noisy unary along colour edges, and the process pool changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from mcis_cli.config import CrfCfg
from mcis_cli.crf import crf_map, dense_crf

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


def test_mismatched_image_is_refused():
    image, probs, _ = _scene(0)
    with pytest.raises(ValueError, match="does not match"):
        dense_crf(image[:-1], probs, CrfCfg())


def test_process_pool_equals_inline_and_keeps_order():
    scenes = [_scene(seed, size=24 + 4 * seed)[:2] for seed in range(5)]
    inline = list(crf_map(iter(scenes), CrfCfg(), jobs=1))
    pooled = list(crf_map(iter(scenes), CrfCfg(), jobs=2))
    labels = list(crf_map(iter(scenes), CrfCfg(), jobs=2, argmax=True))
    assert len(pooled) == len(scenes)
    for a, b, lab, (image, _) in zip(inline, pooled, labels, scenes, strict=True):
        assert a.shape[1:] == image.shape[:2]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lab, a.argmax(0))
        assert lab.dtype == np.uint8
