"""Segment new images with an exported model: ONNX Runtime, numpy and Pillow, no PyTorch.

The inference itself is `mcis_cli.serving`, shared with the served MLflow model, so a mask from
here equals the server's for the same image: photos are read upright (EXIF orientation applied),
and a registered model runs with the provider settings it was exported with. Keep torch out of
every import made here: a test checks.
"""

from __future__ import annotations

import glob
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mcis_cli.data.transforms import load_image, probe_image, save_palette_png, voc_palette
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, describe_os_error, exclusive
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


def _batches(images: list[Path], batch_size: int) -> tuple[list[list[Path]], dict[Path, str]]:
    """Groups of equal-size images (read from the headers), at most `batch_size` each, and the
    images that cannot be read, each with its one-line reason."""
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    unreadable: dict[Path, str] = {}
    for path in images:
        try:
            by_size[probe_image(path, upright=True)].append(path)
        except McisError as exc:
            unreadable[path] = str(exc)
    batches = [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
    return batches, unreadable


@dataclass
class Prediction:
    """What `predict_files` wrote, and the images it could not read (path -> one-line reason)."""

    written: int
    out_dir: Path
    provider: str
    images_per_second: float
    failed: dict[Path, str] = field(default_factory=dict)

    def __str__(self) -> str:
        line = (f"{self.written} image{'s' * (self.written != 1)} -> {self.out_dir} on {self.provider} "
                f"({self.images_per_second:.1f} images/s)")
        return line + (f"; {len(self.failed)} could not be read" if self.failed else "")


def predict_files(model: str | Path, images: list[str], out_dir: str | Path, provider: str = "auto",
                  batch_size: int = 8, settings: dict | None = None) -> Prediction:
    """Write <out>/<stem>.png (palette mask) and <stem>_overlay.jpg for every readable image, at
    its displayed size.

    `model` is a .onnx file or a registry URI (`models:/NAME@champion`); `settings` are the
    provider settings of `serving.provider_list`, read from the registered model for a URI.
    An unreadable image does not stop the others: it is listed in the result's `failed`. When no
    image can be read, nothing is written and the reason is the error.
    """
    if str(model).startswith("models:/"):
        from mcis_cli import tracking  # mlflow only for registry URIs

        model, settings = tracking.download_model(str(model))
    session, used = open_session(model, provider, settings)
    meta = read_metadata(model)
    paths = collect_images(images)
    batches, failed = _batches(paths, batch_size)
    if not batches:
        reason = next(iter(failed.values()))
        raise McisError(reason if len(failed) == 1 else f"none of the {len(failed)} images can be read; "
                                                          f"the first: {reason}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path that cannot be a folder is bad input, not a failed write
        raise McisError(describe_os_error(exc)) from None
    colours = voc_palette()
    start = time.perf_counter()
    with exclusive(out_dir, "--out folder"), work_progress() as progress:
        task = progress.add_task("predict", total=len(paths) - len(failed))
        for batch in batches:
            loaded = []
            for path in batch:
                try:
                    loaded.append((path, load_image(path, upright=True)))
                except McisError as exc:  # the header read, the pixels did not
                    failed[path] = str(exc)
            if not loaded:
                continue
            rgb = np.stack([image for _, image in loaded])
            for (path, image), mask in zip(loaded, infer(session, rgb, meta), strict=True):
                save_palette_png(out_dir / f"{path.stem}.png", mask)
                blend = np.where(mask[..., None] > 0, image // 2 + colours[mask] // 2, image)
                with atomic_path(out_dir / f"{path.stem}_overlay.jpg") as tmp:
                    Image.fromarray(blend).save(tmp, format="JPEG", quality=90)
            progress.update(task, advance=len(batch))
    written = len(paths) - len(failed)
    rate = written / max(time.perf_counter() - start, 1e-9)
    return Prediction(written, out_dir, used, rate, failed)
