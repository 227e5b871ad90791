"""Image and mask I/O and the few augmentations MCIS uses, on numpy arrays (HxWx3 / HxW uint8).

Images are RGB uint8 everywhere; masks are uint8 index maps (0 background, 1..K, 255 ignore).
Dataset images are read as stored: VOC's masks are aligned with the stored pixels, whatever an
EXIF orientation tag says. New photos (`mcis predict`, the served model) are read `upright`, as a
viewer shows them, so that their masks line up with what the user sees.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # padding colour: zero after to_tensor
IGNORE = 255
ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image a quarter

_ENHANCE = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class ImageTooLarge(McisError):
    """An image beyond Pillow's decompression-bomb limit: a served request answers it 413, not 400."""


@contextmanager
def _readable(path: str | Path) -> Iterator[None]:
    """Every way an image file can be unusable becomes one McisError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"{path}: image too large for Pillow's decompression-bomb limit ({exc}); "
            "downscale it or remove it from the inputs"
        ) from None
    except FileNotFoundError:
        raise McisError(f"image not found: {path}") from None
    except UnidentifiedImageError:  # its text repeats the file object, which bytes have no name for
        raise McisError(f"{path}: corrupt or unreadable image (no format Pillow reads); "
                        "replace or remove it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise McisError(
            f"{path}: corrupt or unreadable image ({exc}); replace or remove it"
        ) from None


def _open(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    with _readable(name or path):
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not mid-epoch
    return image


def image_size(source: str | Path | BinaryIO, name: str | None = None) -> tuple[int, int]:
    """(h, w) of an image as stored, from its header alone: what a pixel limit checks before
    decoding (the EXIF orientation is not read: a PNG keeps it after the pixels)."""
    with _readable(name or source):
        image = Image.open(source)
        return image.height, image.width


def probe_image(path: str | Path, upright: bool = False) -> tuple[int, int]:
    """(h, w) of an image, decoding all of it at 1/8 scale: fast, yet a truncated JPEG still fails.
    `upright`: as a viewer shows it (EXIF orientations 5-8 swap the sides)."""
    with _readable(path):
        image = Image.open(path)
        h, w = image.height, image.width
        image.draft(None, (w // 8, h // 8))
        image.load()
        turned = upright and image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    return (w, h) if turned else (h, w)


def load_image(path: str | Path | BinaryIO, name: str | None = None, upright: bool = False) -> np.ndarray:
    """RGB uint8 HxWx3; gray, palette, CMYK, RGBA and 16-bit inputs are converted. `name` says
    what the source is in error messages (a file object, e.g. the bytes of a served request, has
    none). `upright` applies the EXIF orientation (photos); the dataset reader never does."""
    image = _open(path, name)
    if upright:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit / float gray (I;16, I;16B, F): to 8 bit
        values = np.asarray(image, dtype=np.float64)
        span = max(values.max() - values.min(), 1e-12)
        image = Image.fromarray(np.uint8(255 * (values - values.min()) / span))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_index_png(path: str | Path) -> np.ndarray:
    """uint8 HxW class indices from a palette ('P') or gray ('L') PNG; the palette is ignored."""
    image = _open(path)
    if image.mode not in ("P", "L"):
        raise McisError(
            f"{path}: expected an index PNG (palette or 8-bit gray), got mode {image.mode}"
        )
    return np.asarray(image, dtype=np.uint8).copy()


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map as a (256, 3) uint8 array: `voc_palette()[mask]` colours a mask."""
    index = np.arange(256, dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(3):  # index bits 3*bit + channel go to colour bit 7 - bit
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette


def palette_image(mask: np.ndarray) -> Image.Image:
    """An index mask as a Pillow 'P' image with the VOC colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask)
    image.putpalette(voc_palette().tobytes())
    return image


def save_palette_png(path: str | Path, mask: np.ndarray) -> None:
    """Write an index mask as a VOC palette PNG, atomically (a kill never leaves a torn file)."""
    image = palette_image(mask)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) RGB -> float32 scaled to 0-1, then (x - mean) / std, on x's device.
    The one normalisation of the PyTorch side; ONNX serving has a numpy copy (`serving.preprocess`)
    because it must run without torch."""
    import torch  # here, so that data tools and ONNX serving never load torch

    mean = torch.tensor(mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(std, device=x.device).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 3xHxW normalised with the ImageNet mean and std."""
    import torch

    return normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


def resize(image: np.ndarray, size: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """Resize to (h, w) with Pillow; use resample='nearest' for index masks.

    Works on uint8 HxWx3 / HxW and float32 HxW (maps), keeping the dtype.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    out = Image.fromarray(image).resize((w, h), _RESAMPLE[resample])
    return np.asarray(out, dtype=image.dtype).copy()


def random_scale_crop_flip(
    image: np.ndarray,
    mask: np.ndarray,
    crop: int,
    scales: Sequence[float],
    mirror: bool,
    rng: random.Random,
    pick: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """DeepLab training augmentation: one random scale, pad to the crop, random crop, random mirror.

    The scale is uniform over the range (low, high) `scales`, or with `pick` one of the listed
    `scales`, as Caffe's ImageSegData picks one of 0.7, 0.8, ..., 1.3. The image is padded with
    the mean colour (zero after normalisation) and the mask with 255, so padding never counts as
    background, and an image smaller than the crop trains as well. Image and mask get the same
    geometry.
    """
    scale = rng.choice(scales) if pick else rng.uniform(*scales)
    h, w = mask.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = resize(image, size, "bilinear")
    mask = resize(mask, size, "nearest")
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        canvas = np.empty((size[0] + pad_h, size[1] + pad_w, 3), dtype=np.uint8)
        canvas[:] = MEAN_RGB
        canvas[: size[0], : size[1]] = image
        image = canvas
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    top = rng.randint(0, mask.shape[0] - crop)
    left = rng.randint(0, mask.shape[1] - crop)
    image = image[top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    if mirror and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def color_jitter(
    image: np.ndarray, strength: Sequence[float], rng: random.Random | None = None
) -> np.ndarray:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on one RGB image.

    As torchvision: factors uniform in [1 - s, 1 + s] (blends with black, the gray mean, the gray
    image), a hue shift uniform in [-h, h] turns, the four applied in random order. Draws from
    `rng`, else from Python's global generator (which seed_everything and DataLoader workers seed).
    """
    rng = rng or random
    *factors, hue = strength
    ops = [
        (name, rng.uniform(max(0.0, 1 - s), 1 + s))
        for name, s in zip(_ENHANCE, factors, strict=True)
        if s
    ]
    if hue:
        ops.append(("hue", rng.uniform(-hue, hue)))
    rng.shuffle(ops)
    out = Image.fromarray(image)
    for name, value in ops:
        if name == "hue":
            hsv = np.asarray(out.convert("HSV")).copy()
            hsv[..., 0] += np.uint8(round(value * 256) % 256)  # wraps around like an angle
            out = Image.frombytes("HSV", out.size, hsv.tobytes()).convert("RGB")
        else:
            out = _ENHANCE[name](out).enhance(value)
    return np.asarray(out, dtype=np.uint8).copy()
