"""The MLflow model `mcis export` registers: encoded images in, class-index masks out.

Logged as MLflow "models from code": `tracking.log_serving_model` (models.py) hands this file's
path to `mlflow.pyfunc.log_model`, which copies it into the model, and MLflow executes it when the
model is loaded (`mlflow models serve`, `mlflow.pyfunc.load_model`). mcis itself never imports it.
It sits in the tracking package, with every other file that imports mlflow; it has to import
it: MLflow calls `load_context` only on a `PythonModel` subclass, and nothing needs pickling.
The work is `mcis_cli.serving.Segmenter` (torch-free), which the model carries in its
code_paths; this file needs nothing else of mcis.

A request's bad input raises `BadRequest`, an `MlflowException` with INVALID_PARAMETER_VALUE:
the scoring server answers it with the input's HTTP status (400, or 413 beyond the model's size
limits) and the message (any other exception would become a 400 carrying a traceback and a
generic message).
"""

from __future__ import annotations

import sys

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from mcis_cli.serving import BadInput, Segmenter


class BadRequest(MlflowException):
    """Keeps its one-line reason as the message: MLflow's scoring server rewrites the message of
    an MlflowException from predict to "Failed to predict data '<the whole input>'. \nError: ...",
    which echoes the request back over several lines. The server answers with
    `get_http_status_code()`, which MLflow maps from the error code alone (no code maps to 413)."""

    def __init__(self, reason: str, status: int):
        self.reason = reason
        self.status = status
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.reason

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass

    def get_http_status_code(self) -> int:
        return self.status


class SegmenterModel(PythonModel):
    def load_context(self, context):
        config = context.model_config
        self.segmenter = Segmenter(context.artifacts["onnx"], config)
        print(f"mcis: segmenter loaded on {self.segmenter.provider} (asked for {config['providers']})",
              file=sys.stderr, flush=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        try:
            rows = self.segmenter.predict(list(model_input["image"]), bool(params.get("scores")),
                                          params.get("format", "png"))
        except BadInput as exc:
            raise BadRequest(str(exc), exc.status) from None
        return pd.DataFrame(rows)


set_model(SegmenterModel())
