"""The image-only saliency: output contract, that it finds an object, that it reads no mask,
and its scores (F-measure, MAE) on hand-made cases."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from PIL import Image

from mcis_cli import saliency
from mcis_cli.data import transforms, voc


def _scene(size: int = 64, seed: int = 0, side: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A saturated red square on a muted, noisy gray background; returns (image, object mask)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(120, 8, (size, size, 3)).clip(0, 255).astype(np.uint8)
    fg = np.zeros((size, size), bool)
    fg[20 : 20 + side, 30 : 30 + side] = True
    image[fg] = (220, 30, 40)
    return image, fg


def test_contract_and_finds_the_object():
    image, fg = _scene()
    sal = saliency.saliency(image)
    assert sal.dtype == np.float32 and sal.shape == fg.shape
    assert sal.min() >= 0 and sal.max() <= 1 and sal.max() == pytest.approx(1)
    assert sal[fg].mean() > 3 * sal[~fg].mean()
    assert saliency.fmeasure(sal, fg) > 0.8


def test_each_cue_finds_the_object_and_a_flat_image_gives_zeros():
    image, fg = _scene(seed=1, side=8)  # the spectral residual finds compact objects
    for cue in (saliency.spectral_residual, saliency.colour_contrast, saliency.saturation):
        sal = cue(image)
        assert sal[fg].mean() > 2 * sal[~fg].mean()
    flat = np.full((32, 48, 3), 90, np.uint8)
    assert not saliency.saliency(flat).any()
    assert not saliency.binarize(saliency.saliency(flat)).any()  # not "everything is salient"


def test_non_square_and_bad_input():
    image = np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    assert saliency.saliency(image).shape == (40, 90)
    with pytest.raises(ValueError, match="uint8"):
        saliency.saliency(image.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        saliency.saliency(image[..., 0])


def test_lab_of_white_black_and_red():
    lab = saliency.rgb_to_lab(np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8))[0]
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.1)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=1e-3)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.2)  # the standard sRGB red


def test_never_reads_a_file(monkeypatch, tmp_path):
    """saliency(image) sees the pixels it is given and nothing else: no mask, no file at all."""
    image, _ = _scene()

    def refuse(*args, **kwargs):
        raise AssertionError("saliency opened a file")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(voc, "load_mask", refuse)
    monkeypatch.setattr(voc, "mask_path", refuse)
    monkeypatch.setattr(transforms, "read_index_png", refuse)
    sal = saliency.saliency(image)
    assert sal.shape == image.shape[:2]


def test_fmeasure_and_mae_on_hand_made_maps():
    fg = np.zeros((10, 10), bool)
    fg[:5] = True
    perfect = fg.astype(np.float32)
    assert saliency.fmeasure(perfect, fg) == pytest.approx(1)
    assert saliency.mae(perfect, fg) == 0
    assert saliency.fmeasure(1 - perfect, fg) == 0
    assert saliency.mae(1 - perfect, fg) == 1
    # top half of the foreground found: precision 1, recall 0.4 -> F = 1.3 * 0.4 / (0.3 + 0.4)
    half = np.zeros((10, 10), np.float32)
    half[:2] = 1
    assert saliency.fmeasure(half, fg) == pytest.approx(1.3 * 0.4 / 0.7)
    assert saliency.mae(half, fg) == pytest.approx(0.3)
    # ignored pixels do not count: only the found rows are valid -> perfect
    valid = np.zeros((10, 10), bool)
    valid[:2] = valid[5:] = True
    assert saliency.fmeasure(half, fg, valid=valid) == pytest.approx(1)
