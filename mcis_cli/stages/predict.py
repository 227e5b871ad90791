"""Segment new images with an exported model: ONNX Runtime, numpy and Pillow, no PyTorch.

Everything the model needs (class names, normalisation, colour order) is read from the
metadata `export` writes into the .onnx file, so a serving machine needs only this module and
the `cpu` or `gpu` onnxruntime extra. Keep torch out of every import made here: a test checks.
"""

from __future__ import annotations

import glob
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from mcis_cli.data.transforms import load_image, probe_image, save_palette_png, voc_palette
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, describe_os_error, exclusive
from mcis_cli.progress import work_progress

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
JSON_KEYS = ("class_names", "num_classes", "mean", "std", "opset")  # other metadata is plain text
REQUIRED_KEYS = ("class_names", "num_classes", "mean", "std")


def read_metadata(path: str | Path) -> dict:
    """The mcis metadata of an .onnx file (weights are not read), JSON fields decoded."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several types
        raise McisError(f"{path} is not an ONNX model ({type(exc).__name__}); "
                        "pass a file written by `mcis export`") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in REQUIRED_KEYS if key not in props]
    if missing:
        raise McisError(f"{path} lacks the mcis metadata {missing}; export it with `mcis export`")
    try:
        return {key: json.loads(value) if key in JSON_KEYS else value for key, value in props.items()}
    except json.JSONDecodeError:
        raise McisError(f"{path}: damaged mcis metadata (not JSON); export the model again") from None


def open_session(path: str | Path, provider: str = "auto") -> tuple[ort.InferenceSession, str]:
    """A checked model's inference session and the execution provider it really runs on.

    onnxruntime-gpu lists CUDA even on a machine without a GPU and then quietly falls back to
    the CPU, so the provider is read from the session, not from the available list.
    """
    if provider not in ("auto", "cpu", "cuda"):
        raise McisError(f"provider must be auto, cpu or cuda, got {provider!r}")
    path = Path(path)
    if not path.is_file():
        raise McisError(f"model not found: {path} (pass a .onnx file or models:/mcis-deeplab/<version>)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - DecodeError, ValidationError, InferenceError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise McisError(f"{path} is not a valid ONNX model ({first}); "
                        "pass a file written by `mcis export`") from None
    has_cuda = CUDA in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise McisError("--provider cuda: this onnxruntime build has no CUDA support; install the "
                        "`gpu` extra instead of `cpu` (never both), or use --provider cpu")
    wanted = {"cpu": [CPU], "cuda": [CUDA], "auto": [CUDA, CPU] if has_cuda else [CPU]}[provider]
    if provider == "auto":  # a missing GPU is expected here, and the summary names the provider
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), providers=wanted)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
        raise McisError(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings and errors
    used = session.get_providers()[0]
    if provider == "cuda" and used != CUDA:
        raise McisError("--provider cuda: the CUDA execution provider did not start (no usable GPU, "
                        "or CUDA 13 / cuDNN 9 libraries missing); use --provider cpu or auto")
    return session, used


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
            by_size[probe_image(path)].append(path)
        except McisError as exc:
            unreadable[path] = str(exc)
    batches = [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]
    return batches, unreadable


def preprocess(rgb: np.ndarray, meta: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32: scaled to 0-1, then (x - mean) / std."""
    mean = np.asarray(meta["mean"], dtype=np.float32)
    std = np.asarray(meta["std"], dtype=np.float32)
    return np.ascontiguousarray(((rgb.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2))


def infer(session: ort.InferenceSession, rgb: np.ndarray, meta: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W) uint8 class indices."""
    logits = session.run(None, {session.get_inputs()[0].name: preprocess(rgb, meta)})[0]
    return logits.argmax(1).astype(np.uint8)


@dataclass
class Prediction:
    """What `run` wrote, and the images it could not read (path -> one-line reason)."""

    written: int
    out_dir: Path
    provider: str
    images_per_second: float
    failed: dict[Path, str] = field(default_factory=dict)

    def __str__(self) -> str:
        line = (f"{self.written} image{'s' * (self.written != 1)} -> {self.out_dir} on {self.provider} "
                f"({self.images_per_second:.1f} images/s)")
        return line + (f"; {len(self.failed)} could not be read" if self.failed else "")


def run(model: str | Path, images: list[str], out_dir: str | Path, provider: str = "auto",
        batch_size: int = 8) -> Prediction:
    """Write <out>/<stem>.png (palette mask) and <stem>_overlay.jpg for every readable image.

    An unreadable image does not stop the others: it is listed in the result's `failed`. When no
    image can be read, nothing is written and the reason is the error.
    """
    if str(model).startswith("models:/"):
        from mcis_cli import tracking  # mlflow only for registry URIs

        model = tracking.download_model(str(model))
    session, used = open_session(model, provider)
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
                    loaded.append((path, load_image(path)))
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
