"""The MLflow model `mcis export` registers: encoded images in, class-index masks out.

Logged as MLflow "models from code": `tracking.log_serving_model` hands this file's path to
`mlflow.pyfunc.log_model`, which copies it into the model, and MLflow executes it when the model
is loaded (`mlflow models serve`, `mlflow.pyfunc.load_model`). mcis itself never imports it.
That is why it is the one file besides tracking.py that imports mlflow: MLflow calls
`load_context` only on a `PythonModel` subclass, and nothing needs pickling. The work is
`mcis_cli.serving.Segmenter` (torch-free), which the model carries in its code_paths.

A request's bad input raises `MlflowException` with INVALID_PARAMETER_VALUE: the scoring server
answers that with HTTP 400 and the message; any other exception would become a 400 carrying a
traceback and a generic message.
"""

from __future__ import annotations

import sys

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from mcis_cli.serving import BadInput, Segmenter


class SegmenterModel(PythonModel):
    def load_context(self, context):
        providers = (context.model_config or {}).get("providers")
        self.segmenter = Segmenter(context.artifacts["onnx"], providers)
        print(f"mcis: segmenter loaded on {self.segmenter.provider} (asked for {providers})",
              file=sys.stderr, flush=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            rows = self.segmenter.predict(list(model_input["image"]), bool((params or {}).get("scores")))
        except BadInput as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows)


set_model(SegmenterModel())
