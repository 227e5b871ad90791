"""Everything mcis says to and asks of MLflow; no module outside this package imports mlflow.

The engine opens a run with `create_run(...)` or `reopen_run(...)` and logs through the
`Tracker` they return; a later stage finds its input with `resolve_run(...)` and reads files with
`SourceRun.fetch(...)`.

- `store`: where the store is and whether it answers (`tracking_uri`, `server_answers`,
  `client`), the tag names, and the run queries (`resolve_run`, `get_run`, `find_runs`, ...).
- `run`: an open run: the `Tracker` with its buffered metrics, and closing runs whose process
  is gone.
- `models`: the ONNX and served (pyfunc) models `mcis export` logs and registers, and
  `download_model` for a registry URI.
- `registry`: the `@challenger` and `@champion` aliases, and `promote`, behind `mcis promote`.
- `pyfunc_model`: the served model's code, which MLflow runs when it loads the model; mcis
  itself never imports it.
"""

from mcis_cli.tracking.models import (
    ORT_KEYS,
    download_model,
    log_onnx_model,
    log_serving_model,
    serving_config,
    set_model_version_tag,
)
from mcis_cli.tracking.registry import CHALLENGER, CHAMPION, promote, set_challenger
from mcis_cli.tracking.run import (
    UNSENT,
    WAIT_ENV,
    Nest,
    Tracker,
    chain_role,
    check_resumable,
    close_dead_runs,
    create_run,
    reopen_run,
    system_metrics,
)
from mcis_cli.tracking.store import (
    ABLATION,
    BASELINE,
    CEILING,
    END_TAG,
    FINGERPRINT_TAG,
    KIND_TAG,
    LABELS_TAG,
    METHOD,
    METHOD_TAG,
    PROCESS_TAG,
    ROLE_TAG,
    SOURCE_TAG,
    STAGE_TAG,
    STEP_TAG,
    TRAINING_KIND,
    SourceRun,
    client,
    experiment_id,
    experiment_name,
    find_runs,
    finished_children,
    fluent,
    get_run,
    resolve_run,
    server_answers,
    tracking_uri,
)

__all__ = [
    "ABLATION", "BASELINE", "CEILING", "CHALLENGER", "CHAMPION", "END_TAG", "FINGERPRINT_TAG", "ORT_KEYS", "KIND_TAG", "LABELS_TAG", "METHOD", "METHOD_TAG", "ROLE_TAG",
    "SOURCE_TAG", "STAGE_TAG", "STEP_TAG", "TRAINING_KIND", "UNSENT", "WAIT_ENV",
    "Nest", "SourceRun", "Tracker",
    "client", "download_model", "experiment_id", "experiment_name", "find_runs", "finished_children", "fluent", "PROCESS_TAG",
    "get_run", "log_onnx_model", "log_serving_model", "promote", "resolve_run", "server_answers",
    "serving_config", "set_challenger", "set_model_version_tag", "tracking_uri", "chain_role", "check_resumable", "close_dead_runs", "create_run", "reopen_run", "system_metrics",
]
