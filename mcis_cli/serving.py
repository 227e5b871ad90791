"""ONNX Runtime inference on exported models, without PyTorch: what `mcis predict` and the MLflow
model that `mcis export` registers both run.

Everything a model needs (class names, normalisation, colour order) is read from the metadata
`export` writes into the .onnx file. The registered model carries this module and the few mcis
modules it imports (SERVING_CODE) in its code_paths, so a serving environment needs only
onnxruntime, numpy, Pillow and MLflow: `onnx` is imported only where a file is checked or read
here, never by `Segmenter`. Keep torch out of every import made here: a test checks.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mcis_cli.data.transforms import load_image
from mcis_cli.errors import McisError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
JSON_KEYS = ("class_names", "num_classes", "mean", "std", "opset")  # other metadata is plain text
REQUIRED_KEYS = ("class_names", "num_classes", "mean", "std")
MIN_SIDE = 8  # px: the network's output stride; a smaller image holds less than one feature cell
# This module and what it imports from mcis_cli, relative to the package: the served model's code.
SERVING_CODE = ("__init__.py", "errors.py", "files.py", "serving.py", "data/__init__.py",
                "data/transforms.py")


class BadInput(McisError):
    """A request the served model cannot segment: the client's fault, answered with HTTP 400."""


def decode_metadata(props: dict[str, str], where: object) -> dict:
    """The mcis metadata_props of a model, JSON fields decoded; `where` names it in errors."""
    missing = [key for key in REQUIRED_KEYS if key not in props]
    if missing:
        raise McisError(f"{where} lacks the mcis metadata {missing}; export it with `mcis export`")
    try:
        return {key: json.loads(value) if key in JSON_KEYS else value for key, value in props.items()}
    except json.JSONDecodeError:
        raise McisError(f"{where}: damaged mcis metadata (not JSON); export the model again") from None


def read_metadata(path: str | Path) -> dict:
    """The mcis metadata of an .onnx file (weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several types
        raise McisError(f"{path} is not an ONNX model ({type(exc).__name__}); "
                        "pass a file written by `mcis export`") from None
    return decode_metadata({p.key: p.value for p in model.metadata_props}, path)


def check_model(path: Path) -> None:
    """The ONNX checker on a file, as a one-line error."""
    import onnx

    if not path.is_file():
        raise McisError(f"model not found: {path} (pass a .onnx file or models:/mcis-deeplab/<version>)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - DecodeError, ValidationError, InferenceError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise McisError(f"{path} is not a valid ONNX model ({first}); "
                        "pass a file written by `mcis export`") from None


def start_session(path: str | Path, provider: str = "auto") -> tuple[ort.InferenceSession, str]:
    """An inference session and the execution provider it really runs on.

    onnxruntime-gpu lists CUDA even on a machine without a GPU and then quietly falls back to
    the CPU, so the provider is read from the session, not from the available list.
    """
    if provider not in ("auto", "cpu", "cuda"):
        raise McisError(f"provider must be auto, cpu or cuda, got {provider!r}")
    has_cuda = CUDA in ort.get_available_providers()
    if provider == "cuda" and not has_cuda:
        raise McisError("--provider cuda: this onnxruntime build has no CUDA support; install the "
                        "`gpu` extra instead of `cpu` (never both), or use --provider cpu")
    wanted = {"cpu": [CPU], "cuda": [CUDA], "auto": [CUDA, CPU] if has_cuda else [CPU]}[provider]
    if CUDA in wanted and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia pip wheels of onnxruntime-gpu[cuda,cudnn]
    if provider == "auto":  # a missing GPU is expected here, and the caller reports the provider
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


def open_session(path: str | Path, provider: str = "auto") -> tuple[ort.InferenceSession, str]:
    """A checked model's inference session and the execution provider it really runs on."""
    path = Path(path)
    check_model(path)
    return start_session(path, provider)


def preprocess(rgb: np.ndarray, meta: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32: scaled to 0-1, then (x - mean) / std.
    The numpy twin of `transforms.normalize`: a served model's environment has no torch."""
    mean = np.asarray(meta["mean"], dtype=np.float32)
    std = np.asarray(meta["std"], dtype=np.float32)
    return np.ascontiguousarray(((rgb.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2))


def logits(session: ort.InferenceSession, rgb: np.ndarray, meta: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, K, H, W) float32 logits."""
    return session.run(None, {session.get_inputs()[0].name: preprocess(rgb, meta)})[0]


def infer(session: ort.InferenceSession, rgb: np.ndarray, meta: dict) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, H, W) uint8 class indices."""
    return logits(session, rgb, meta).argmax(1).astype(np.uint8)


def decode_image(data: object, index: int) -> np.ndarray:
    """The encoded image bytes of request row `index` as HxWx3 uint8 RGB, or a BadInput naming
    the problem (not bytes, not an image, Pillow's decompression-bomb limit, too small)."""
    if not isinstance(data, bytes | bytearray) or not data:
        kind = "empty bytes" if isinstance(data, bytes | bytearray) else type(data).__name__
        raise BadInput(f"image {index}: expected the bytes of an encoded image (base64 in JSON), got {kind}")
    try:
        rgb = load_image(io.BytesIO(data), f"image {index}")
    except McisError as exc:
        raise BadInput(str(exc)) from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise BadInput(f"image {index}: {w}x{h} px is below the {MIN_SIDE} px minimum side")
    return rgb


class Segmenter:
    """An exported .onnx file ready for requests: encoded images in, class-index masks out.

    `providers` is the preference order (the served model's MLmodel lists it): with CUDA in it
    the session runs on CUDA when onnxruntime-gpu and a GPU are there, else on the CPU;
    `provider` is the one the session really uses.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        self.session, self.provider = start_session(path, "auto" if CUDA in (providers or []) else "cpu")
        meta = self.session.get_modelmeta()
        self.meta = decode_metadata(meta.custom_metadata_map, path)

    def predict(self, images: list, scores: bool = False) -> list[dict]:
        """One row per image: `mask` (HxW uint8 class indices) and, with `scores`, each class's
        highest softmax probability over the image (class order of `meta["class_names"]`)."""
        rows = []
        for index, data in enumerate(images):
            rgb = decode_image(data, index)
            out = logits(self.session, rgb[None], self.meta)[0]
            row = {"mask": out.argmax(0).astype(np.uint8)}
            if scores:
                exp = np.exp(out - out.max(0, keepdims=True))
                row["scores"] = (exp / exp.sum(0, keepdims=True)).reshape(len(out), -1).max(1).tolist()
            rows.append(row)
        return rows
