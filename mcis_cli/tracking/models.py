"""The models `mcis export` logs and registers, and the way back from a registry URI to a file.

Kept apart from run logging because a model carries more than its weights: an MLflow signature,
the pinned requirements of the environment that serves it, and for the served (pyfunc) model the
torch-free serving code it runs without mcis installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from mcis_cli.config import ExportCfg
from mcis_cli.errors import McisError
from mcis_cli.tracking.store import fluent, require_store, tracking_uri

# export.serving: the onnxruntime package a served model's environment installs (the pins of
# pyproject.toml's cpu and gpu extras; the gpu one with CUDA 13 and cuDNN 9 from pip)
ONNXRUNTIME = {"cpu": "onnxruntime==1.32.0", "gpu": "onnxruntime-gpu[cuda,cudnn]==1.31.1"}
PYFUNC_MODEL = Path(__file__).resolve().parent / "pyfunc_model.py"  # the served model, as code
ORT_KEYS = ("providers", "cudnn_conv_algo_search", "tensorrt")  # the version tag `onnxruntime`


def serving_config(ex: ExportCfg) -> dict[str, Any]:
    """The served model's MLmodel config, what `serving.Segmenter` and `mcis predict` read: the
    execution providers it lists, best first (those of `provider_list` where every one is
    installed), their settings, and the request limits."""
    from mcis_cli.serving import CPU, CUDA, TENSORRT, provider_list  # onnxruntime: only when needed

    settings = {"cudnn_conv_algo_search": ex.cudnn_conv_algo_search, "tensorrt": ex.tensorrt}
    mode = "auto" if ex.serving == "gpu" else "cpu"
    providers = [name for name, _ in provider_list(mode, settings, [TENSORRT, CUDA, CPU])]
    return {"providers": providers, **settings, "max_pixels": ex.max_pixels, "max_request_mb": ex.max_request_mb}


def serving_requirements(serving: str) -> list[str]:
    """Pinned requirements of a served model: this environment's versions of what the serving
    code imports, and the onnxruntime package of the `serving` variant."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "pandas", "pillow")] + [ONNXRUNTIME[serving]]


def log_onnx_model(tracker, model_proto, name: str, input_example, registered_name: str | None = None,
                   ex: ExportCfg | None = None):
    """Log an ONNX model to the tracker's run, with a signature whose batch, height and width
    stay dynamic, and the providers and requirements of the export settings `ex`."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "input")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1), "logits")]),
    )
    ex = ex or ExportCfg()
    with fluent(tracker.uri), mlflow.start_run(run_id=tracker.run_id):
        return mlflow.onnx.log_model(
            model_proto,
            name=name,
            signature=signature,
            input_example={"input": input_example},
            registered_model_name=registered_name,
            onnx_execution_providers=serving_config(ex)["providers"],
            pip_requirements=serving_requirements(ex.serving),
            # one file, as `mcis export` writes it: onnx creates external data files 0600
            save_as_external_data=False,
        )


def log_serving_model(tracker, onnx_path: Path, name: str, example_image: bytes,
                      registered_name: str | None, ex: ExportCfg):
    """Log (and register) the served model to the tracker's run: mcis_cli/tracking/pyfunc_model.py
    as models-from-code, the .onnx file as its artifact, the torch-free serving code in its
    code_paths, so an environment built from its requirements alone (`--env-manager virtualenv`,
    `mlflow models build-docker`) serves it without mcis installed, and `serving_config(ex)`."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from mcis_cli import serving as serving_code

    package = Path(serving_code.__file__).parent
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec(DataType.string, "mask_png", required=False),  # base64 palette PNG
                        ColSpec(Array(Array(DataType.long)), "mask", required=False),  # format: lists
                        ColSpec(Array(DataType.double), "scores", required=False)]),
        params=ParamSchema([ParamSpec("scores", "boolean", False), ParamSpec("format", "string", "png")]),
    )
    with tempfile.TemporaryDirectory() as tmp, fluent(tracker.uri), mlflow.start_run(run_id=tracker.run_id):
        code = Path(tmp) / "mcis_cli"
        for relative in serving_code.SERVING_CODE:
            (code / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(package / relative, code / relative)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_MODEL),
            artifacts={"onnx": str(onnx_path)},
            code_paths=[str(code)],
            signature=signature,
            input_example=pd.DataFrame({"image": [example_image]}),
            model_config=serving_config(ex),
            pip_requirements=serving_requirements(ex.serving),
            registered_model_name=registered_name,
        )


def set_model_version_tag(tracker, name: str, version: str, key: str, value: Any) -> None:
    """Tag version `version` of the registered model `name` (through the tracker's client)."""
    tracker.client.set_model_version_tag(name, version, key, str(value))


def download_model(uri: str) -> tuple[Path, dict[str, Any]]:
    """Local .onnx file behind a registry URI such as `models:/mcis-deeplab@champion` or
    `models:/mcis-deeplab/3` (read in place from a local store, downloaded from a server), and
    the served model's config (`serving_config`; empty for a plain ONNX model)."""
    import mlflow
    from mlflow.models import Model

    require_store(None, f"model {uri} not found in the registry")
    try:
        with fluent(tracking_uri()):
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - mlflow raises different types per store
        raise McisError(
            f"model {uri} not found in the registry at {tracking_uri()} ({type(exc).__name__}); "
            "check the name and the version or alias (`mcis promote` sets @champion), e.g. in `mcis ui`"
        ) from None
    found = sorted(folder.rglob("*.onnx"))  # the served model keeps it under artifacts/
    if not found:
        raise McisError(f"model {uri} holds no .onnx file; register one with `mcis export`")
    pyfunc = Model.load(folder).flavors.get("python_function", {})
    return found[0], pyfunc.get("config") or {}
