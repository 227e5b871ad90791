"""Segment new images with an exported model: ONNX Runtime, numpy and Pillow, no PyTorch.

The inference itself is `mcis_cli.serving`, shared with the served MLflow model, so a mask from
here equals the server's for the same image. Keep torch out of every import made here: a test
checks.
"""

from __future__ import annotations

import glob
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from mcis_cli.data.transforms import load_image, probe_image, save_palette_png, voc_palette
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, exclusive
from mcis_cli.progress import work_progress
from mcis_cli.serving import infer, open_session, read_metadata

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def collect_images(items: list[str]) -> list[Path]:
    """Files, folders (their images, not recursive) and globs, in order, each once."""
    found: dict[Path, None] = {}
    for item in items:
        path = Path(item)
        if path.is_file():
            matches = [path]
        else:
            listed = path.iterdir() if path.is_dir() else map(Path, glob.glob(item, recursive=True))
            matches = sorted(p for p in listed if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not matches:
            raise McisError(f"no images found at {item!r} (pass image files, folders or globs)")
        found.update((p.resolve(), None) for p in matches)
    images = list(found)
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise McisError(f"{stems[image.stem]} and {image} would both write {image.stem}.png; "
                            "predict them into separate --out folders")
        stems[image.stem] = image
    return images


def _batches(images: list[Path], batch_size: int) -> list[list[Path]]:
    """Groups of equal-size images (read from the headers), at most `batch_size` each."""
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in images:
        h, w = probe_image(path)
        by_size[(h, w)].append(path)
    return [group[i : i + batch_size]
            for group in by_size.values() for i in range(0, len(group), batch_size)]


def run(model: str | Path, images: list[str], out_dir: str | Path, provider: str = "auto",
        batch_size: int = 8) -> str:
    """Write <out>/<stem>.png (palette mask) and <stem>_overlay.jpg for every image."""
    if str(model).startswith("models:/"):
        from mcis_cli import tracking  # mlflow only for registry URIs

        model = tracking.download_model(str(model))
    session, used = open_session(model, provider)
    meta = read_metadata(model)
    paths = collect_images(images)
    batches = _batches(paths, batch_size)
    out_dir = Path(out_dir)
    colours = voc_palette()
    start = time.perf_counter()
    with exclusive(out_dir, "--out folder"), work_progress() as progress:
        task = progress.add_task("predict", total=len(paths))
        for batch in batches:
            rgb = np.stack([load_image(path) for path in batch])
            for path, image, mask in zip(batch, rgb, infer(session, rgb, meta), strict=True):
                save_palette_png(out_dir / f"{path.stem}.png", mask)
                blend = np.where(mask[..., None] > 0, image // 2 + colours[mask] // 2, image)
                with atomic_path(out_dir / f"{path.stem}_overlay.jpg") as tmp:
                    Image.fromarray(blend).save(tmp, format="JPEG", quality=90)
            progress.update(task, advance=len(batch))
    rate = len(paths) / max(time.perf_counter() - start, 1e-9)
    return f"{len(paths)} image{'s' * (len(paths) != 1)} -> {out_dir} on {used} ({rate:.1f} images/s)"
