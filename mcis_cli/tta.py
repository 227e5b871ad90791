"""Test-time segmentation as the official MCIS code does it [code eval_res.py, utils.py].

Every scale: resize, normalise, forward (in windows when the image is larger than `window`),
softmax, resize the probabilities back; then average over scales and horizontal flips.

`upsample="official"` is the Caffe path: bicubic resizes of the image and of the probabilities,
and an image smaller than the window zero-padded (the mean colour, after normalisation) to the
full window, so that every forward is window x window (401 = 8 * 50 + 1, the size at which the
x8 upsampling inside the model is exact) and the padding is cropped off the probabilities.
What remains different: RGB with the ImageNet mean/std is fed instead of BGR minus the mean
(the resize is linear, so resizing before or after normalising agrees up to rounding).
`upsample="bilinear"` resizes bilinearly (bicubic can push probabilities below 0; the CRF floors
them at 1e-4) and clips windows to the image instead of padding it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mcis_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets that cover 0..size with the last window flush with the end."""
    if size <= window:
        return [0]
    return sorted({*range(0, size - window, stride), size - window})


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode=mode, align_corners=False)


def _probs(model: nn.Module, x: torch.Tensor, window: int, pad: bool = False) -> torch.Tensor:
    """Softmax of (N, 3, h, w) at input size; overlapping windows are averaged. With `pad`, a
    side shorter than the window is zero-padded (bottom / right) to it, then cropped off again."""
    h, w = x.shape[-2:]
    if pad and window > 0 and (h < window or w < window):
        padded = F.pad(x, (0, max(window - w, 0), 0, max(window - h, 0)))
        return _probs(model, padded, window)[..., :h, :w]
    if window <= 0 or (h <= window and w <= window):
        logits = model(x)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.softmax(1)
    stride = max(1, window * 2 // 3)  # 401 -> 267 [code eval_res.py]
    total = hits = None
    for top in _starts(h, window, stride):
        for left in _starts(w, window, stride):
            crop = x[..., top : top + window, left : left + window]
            p = _probs(model, crop, 0)
            if total is None:
                total = x.new_zeros(x.shape[0], p.shape[1], h, w)
                hits = x.new_zeros(1, 1, h, w)
            total[..., top : top + window, left : left + window] += p
            hits[..., top : top + window, left : left + window] += 1
    return total / hits


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int = 0,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    upsample: str = "bilinear",
) -> np.ndarray:
    """(C, H, W) float32 class probabilities of an HxWx3 uint8 RGB image.

    `model` maps normalised (N, 3, h, w) images to (N, C, h, w) logits and should be in eval
    mode. A flip and its original go through the network as one batch of two. `upsample` is
    "official" (bicubic, windows padded to full size) or "bilinear" (see the module docstring).
    """
    if upsample not in ("official", "bilinear"):
        raise ValueError(f"upsample must be 'official' or 'bilinear', got {upsample!r}")
    mode, pad = ("bicubic", True) if upsample == "official" else ("bilinear", False)
    h, w = image.shape[:2]
    x = normalize(torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None], mean, std)
    total = None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        xs = _resize(x, size, mode)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        p = _probs(model, xs, window, pad)
        p = p[:1] + p[1:].flip(-1) if flip else p
        p = _resize(p, (h, w), mode)
        total = p if total is None else total + p
    views = len(scales) * (2 if flip else 1)
    return (total[0] / views).float().cpu().numpy()
