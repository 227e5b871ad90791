"""ONNX Runtime inference on exported models, without PyTorch: what `mcis predict` and the MLflow
model that `mcis export` registers both run.

Everything a model needs (class names, normalisation, colour order) is read from the metadata
`export` writes into the .onnx file; how it runs (execution providers and their options, the
served model's size limits) comes from the export settings the registered model carries in its
MLmodel config. The registered model carries this module and the few mcis modules it imports
(SERVING_CODE) in its code_paths, so a serving environment needs only onnxruntime, numpy, Pillow
and MLflow: `onnx` is imported only where a file is checked or read here, never by `Segmenter`.
Keep torch out of every import made here: a test checks.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mcis_cli.data.transforms import ImageTooLarge, image_size, load_image, palette_image
from mcis_cli.errors import McisError

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
PROVIDER_MODES = ("auto", "cpu", "cuda")
JSON_KEYS = ("class_names", "num_classes", "mean", "std", "opset")  # other metadata is plain text
REQUIRED_KEYS = ("class_names", "num_classes", "mean", "std")
MIN_SIDE = 8  # px: the network's output stride; a smaller image holds less than one feature cell
FORMATS = ("png", "lists")  # a served mask: base64 PNG (`mask_png`), or nested lists (`mask`)
# This module and what it imports from mcis_cli, relative to the package: the served model's code.
SERVING_CODE = ("__init__.py", "errors.py", "files.py", "serving.py", "data/__init__.py",
                "data/transforms.py")


class BadInput(McisError):
    """A request the served model cannot segment: the client's fault, answered with `status`."""

    status = 400


class TooLarge(BadInput):
    """A request beyond the served model's limits (export.max_pixels, export.max_request_mb)."""

    status = 413


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


def tensorrt_cache() -> Path:
    """Where TensorRT keeps the engines it builds (minutes each), so a restart reuses them."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcis" / "tensorrt"


def provider_list(provider: str, settings: dict, available: list[str]) -> list[tuple[str, dict]]:
    """The execution providers a session asks for, best first, each with its options.

    `settings` are the export settings a registered model carries (empty for a bare .onnx file:
    the defaults): TensorRT first only when `tensorrt` opts in, CUDA with `cudnn_conv_algo_search`
    (HEURISTIC unless set: EXHAUSTIVE times every algorithm again for each new input size), then
    the CPU; each only where this onnxruntime build has it. `provider` cpu keeps the CPU alone,
    cuda leaves it out.
    """
    if provider not in PROVIDER_MODES:
        raise McisError(f"provider must be auto, cpu or cuda, got {provider!r}")
    if provider == "cpu":
        return [(CPU, {})]
    if provider == "cuda" and CUDA not in available:
        raise McisError("--provider cuda: this onnxruntime build has no CUDA support; install the "
                        "`gpu` extra instead of `cpu` (never both), or use --provider cpu")
    wanted = [(CUDA, {"cudnn_conv_algo_search": settings.get("cudnn_conv_algo_search", "HEURISTIC")})]
    if settings.get("tensorrt"):
        wanted.insert(0, (TENSORRT, {"trt_engine_cache_enable": "True",
                                     "trt_engine_cache_path": str(tensorrt_cache())}))
    chosen = [(name, options) for name, options in wanted if name in available]
    return chosen if provider == "cuda" else [*chosen, (CPU, {})]


def start_session(path: str | Path, provider: str = "auto",
                  settings: dict | None = None) -> tuple[ort.InferenceSession, str]:
    """An inference session and the execution provider it really runs on.

    onnxruntime-gpu lists CUDA even on a machine without a GPU and then quietly falls back to
    the CPU, so the provider is read from the session, not from the available list.
    """
    chosen = provider_list(provider, settings or {}, ort.get_available_providers())
    names = [name for name, _ in chosen]
    if set(names) & set(GPU_PROVIDERS) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia pip wheels of onnxruntime-gpu[cuda,cudnn]
    if TENSORRT in names:
        tensorrt_cache().mkdir(parents=True, exist_ok=True)
    if provider == "auto":  # a missing GPU is expected here, and the caller reports the provider
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), providers=names,
                                       provider_options=[options for _, options in chosen])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/RuntimeException types
        raise McisError(f"onnxruntime cannot load {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings and errors
    used = session.get_providers()[0]
    if provider == "cuda" and used not in GPU_PROVIDERS:
        raise McisError("--provider cuda: the CUDA execution provider did not start (no usable GPU, "
                        "or CUDA 13 / cuDNN 9 libraries missing); use --provider cpu or auto")
    return session, used


def open_session(path: str | Path, provider: str = "auto",
                 settings: dict | None = None) -> tuple[ort.InferenceSession, str]:
    """A checked model's inference session and the execution provider it really runs on."""
    path = Path(path)
    check_model(path)
    return start_session(path, provider, settings)


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


def decode_image(data: object, index: int, max_pixels: int) -> np.ndarray:
    """The encoded image bytes of request row `index` as HxWx3 uint8 RGB, upright as a viewer
    shows it (EXIF orientation applied), or a BadInput naming the problem: not bytes, not an
    image, too small; a TooLarge beyond `max_pixels`, checked on the header before decoding."""
    if not isinstance(data, bytes | bytearray) or not data:
        kind = "empty bytes" if isinstance(data, bytes | bytearray) else type(data).__name__
        raise BadInput(f"image {index}: expected the bytes of an encoded image (base64 in JSON), got {kind}")
    name = f"image {index}"
    try:
        h, w = image_size(io.BytesIO(data), name)
        if h * w > max_pixels:
            raise TooLarge(f"{name}: {w}x{h} px is beyond the served model's limit of {max_pixels} "
                           "pixels (export.max_pixels); downscale it")
        rgb = load_image(io.BytesIO(data), name, upright=True)
    except ImageTooLarge as exc:
        raise TooLarge(str(exc)) from None
    except BadInput:
        raise
    except McisError as exc:
        raise BadInput(str(exc)) from None
    if min(h, w) < MIN_SIDE:
        raise BadInput(f"{name}: {w}x{h} px is below the {MIN_SIDE} px minimum side")
    return rgb


def encode_png(mask: np.ndarray) -> str:
    """A mask as the base64 text of a VOC palette PNG: the file `mcis predict` writes, at about
    1/85 of the nested lists' JSON (a 640x427 photo: 11 KB against 926 KB, README "Serving")."""
    buffer = io.BytesIO()
    palette_image(mask).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Segmenter:
    """An exported .onnx file ready for requests: encoded images in, class-index masks out.

    `config` is the served model's (its MLmodel lists it): `providers`, the preference order
    (with a GPU provider in it the session runs on the GPU when onnxruntime-gpu and a GPU are
    there, else on the CPU), the provider settings of `provider_list`, and the limits
    `max_pixels` and `max_request_mb`. `provider` is the one the session really uses.
    """

    def __init__(self, path: str | Path, config: dict):
        gpu = bool(set(config["providers"]) & set(GPU_PROVIDERS))
        self.session, self.provider = start_session(path, "auto" if gpu else "cpu", config)
        meta = self.session.get_modelmeta()
        self.meta = decode_metadata(meta.custom_metadata_map, path)
        self.max_pixels = int(config["max_pixels"])
        self.max_bytes = int(float(config["max_request_mb"]) * 1e6)

    def predict(self, images: list, scores: bool = False, encoding: str = "png") -> list[dict]:
        """One row per image: the mask (HxW class indices) as `mask_png` (base64 PNG) or, with
        `encoding` "lists", as `mask` (nested lists in JSON); with `scores`, each class's highest
        softmax probability over the image (class order of `meta["class_names"]`)."""
        if encoding not in FORMATS:
            raise BadInput(f"params.format must be one of {', '.join(FORMATS)}, got {encoding!r}")
        size = sum(len(data) for data in images if isinstance(data, bytes | bytearray))
        if size > self.max_bytes:
            raise TooLarge(f"the request's {len(images)} images hold {size / 1e6:.1f} MB, beyond the "
                           f"served model's limit of {self.max_bytes / 1e6:g} MB (export.max_request_mb); "
                           "send fewer images per request")
        rows = []
        for index, data in enumerate(images):
            rgb = decode_image(data, index, self.max_pixels)
            out = logits(self.session, rgb[None], self.meta)[0]
            mask = out.argmax(0).astype(np.uint8)
            row = {"mask_png": encode_png(mask)} if encoding == "png" else {"mask": mask}
            if scores:
                exp = np.exp(out - out.max(0, keepdims=True))
                row["scores"] = (exp / exp.sum(0, keepdims=True)).reshape(len(out), -1).max(1).tolist()
            rows.append(row)
        return rows
