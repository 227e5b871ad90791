"""The only module that talks to MLflow.

A stage opens a run with `stage_run(...)`, logs through the `Tracker` it yields, and a later
stage finds its input with `resolve_run(...)` and reads files with `SourceRun.fetch(...)`.
Step-wise metrics are buffered and sent with `log_batch`, so a remote server is not hit per
step; if the server is unreachable the buffer is kept and sent on the next flush.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mcis_cli.config import Config, load_logged
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, exclusive_file, remove_partials
from mcis_cli.progress import console

DEFAULT_URI = "sqlite:///mlflow.db"
STAGE_TAG = "mcis.stage"
SOURCE_TAG = "mcis.source_run"
STEP_TAG = "mcis.step"  # a pipeline's name for the step a nested run is: classify, segment_gt, ...
ROLE_TAG = "mcis.role"  # which chain a run belongs to: one of ROLES
METHOD, BASELINE, CEILING, ABLATION = "method", "baseline", "ceiling", "ablation"
LABELS_TAG = "mcis.labels"  # set by segment: "gt" marks the fully supervised ceiling
MAX_BUFFER = 100_000  # metrics kept while a server is away
RETRY_SECONDS = 30.0  # after a failed flush, steps only buffer until this much time has passed
PROCESS_TAG = "mcis.process"  # "<host>:<pid>:<start>" of the process that has the run open
END_TAG = "mcis.end_reason"  # why a run was closed by someone else than its own process
WAIT_ENV = "MCIS_TRACKING_WAIT"  # seconds a file upload waits for a server that went away
DEFAULT_WAIT = 600.0
UNSENT = "unsent-metrics.jsonl"  # in the run's folder: metrics a failed run could not send
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow UI's kind
# export.serving: the onnxruntime package a served model's environment installs (the pins of
# pyproject.toml's cpu and gpu extras; the gpu one with CUDA 13 and cuDNN 9 from pip), and the
# execution providers its MLmodel lists, tried in that order
ONNXRUNTIME = {"cpu": "onnxruntime==1.32.0", "gpu": "onnxruntime-gpu[cuda,cudnn]==1.31.1"}
SERVING_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                     "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def tracking_uri(cfg: Config | None = None) -> str:
    """MLFLOW_TRACKING_URI, else the config's, else ./mlflow.db made absolute.

    Absolute because MLflow caches one database engine per URI string: a relative URI would
    keep pointing at the first working directory's database after a chdir.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    return "sqlite:///" + str(Path(DEFAULT_URI.removeprefix("sqlite:///")).resolve())


def _check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
            if reply.status == 200:
                return
    except (urllib.error.URLError, OSError):
        pass
    raise McisError(
        f"tracking server unreachable at {uri} (start it, e.g. `mcis ui`, or unset MLFLOW_TRACKING_URI)"
    )


def _check_login(mlc, uri: str) -> None:
    """A server with authentication (docker-compose.yml's) answers 401 to a missing or wrong login."""
    from mlflow.exceptions import MlflowException

    try:
        mlc.search_experiments(max_results=1)
    except MlflowException as exc:
        code = exc.get_http_status_code()
        if code not in (401, 403):
            raise
        raise McisError(
            f"tracking server {uri} refused the login (HTTP {code}); set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD to an account on it"
        ) from None


def client(cfg: Config | None = None):
    """An MlflowClient on the configured store, after checking a remote server answers."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    _check_reachable(uri)
    # "Creating initial MLflow database tables..." would precede every first command's output
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if uri.startswith(("http://", "https://")):
        _check_login(mlc, uri)
    return mlc


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.name


def _require_store(cfg: Config | None, sought: str) -> None:
    """A lookup in a sqlite store that does not exist fails here: opening it would create an
    mlflow.db (in a folder where the command then fails) only to find nothing in it."""
    if missing := _missing_store(cfg):
        raise McisError(f"{sought}: no tracking store at {missing} (nothing was logged from this folder); "
                        "run the earlier stages here first, or set MLFLOW_TRACKING_URI to their store")


def _missing_store(cfg: Config | None = None) -> str | None:
    """The file of the sqlite store if it does not exist yet."""
    uri = tracking_uri(cfg)
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return path if uri.startswith("sqlite:///") and not Path(path).exists() else None


def experiment_id(mlc, cfg: Config) -> str:
    """The config's experiment, created if new, marked as model training for the MLflow UI."""
    name = experiment_name(cfg)
    found = mlc.get_experiment_by_name(name)
    if found is None:
        return mlc.create_experiment(name, tags={KIND_TAG: TRAINING_KIND})
    if KIND_TAG not in found.tags:  # made by an older mcis or by mlflow itself
        mlc.set_experiment_tag(found.experiment_id, KIND_TAG, TRAINING_KIND)
    return found.experiment_id


def git_commit() -> str:
    """HEAD of the source checkout; in an image built without .git, MCIS_GIT_COMMIT (a build arg)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MCIS_GIT_COMMIT", "unknown")


def dataset_fingerprint(root: str | Path) -> str:
    """Hash of the split and label lists: cheap, and changes whenever the dataset does."""
    lists = Path(root) / "ImageSets" / "Segmentation"
    digest = hashlib.sha256()
    for path in sorted(lists.glob("*.txt")) if lists.is_dir() else []:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process `pid` from /proc; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS): existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "R", ""
    fields = text.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return fields[0], fields[19]


def _machine() -> str:
    """The host name, plus the pid namespace where there is one: containers sharing a host name
    still see different processes under one pid, so each namespace counts as a machine."""
    try:
        return f"{socket.gethostname()}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def process_identity(pid: int | None = None) -> str:
    """This process as `<machine>:<pid>:<start time>`: the start time tells a reused pid apart."""
    pid = pid or os.getpid()
    stat = _proc_stat(pid)
    return f"{_machine()}:{pid}:{stat[1] if stat else ''}"


def process_alive(identity: str) -> bool | None:
    """Whether the process named by `process_identity` still runs; None if it ran on another host."""
    try:
        host, pid_text, start = identity.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != _machine():
        return None
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie nobody has reaped yet
        return False
    return not (start and stat[1] and stat[1] != start)


def close_dead_runs(mlc, experiment: str) -> list[str]:
    """Mark KILLED every RUNNING run of `experiment` whose process (on this host) is gone.

    A process killed with SIGKILL, or a machine that lost power, cannot close its run; the next
    mcis command that opens a run in the same experiment does it. Runs whose process ran on
    another host are left alone: their state cannot be known from here.
    """
    closed = []
    for run in mlc.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000):
        identity = run.data.tags.get(PROCESS_TAG, "")
        if not identity or process_alive(identity) is not False:
            continue
        run_id = run.info.run_id
        pid = identity.rsplit(":", 2)[1]
        reason = (f"process {pid} on {socket.gethostname()} ended without closing the run "
                  f"(killed or crashed); marked KILLED by process {os.getpid()} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        mlc.set_tag(run_id, END_TAG, reason)
        mlc.set_terminated(run_id, status="KILLED")
        stage = run.data.tags.get(STAGE_TAG, "?")
        print(f"note: {stage} run {run_id} was left RUNNING by process {pid}, which is gone: "
              "marked KILLED", file=sys.stderr)
        closed.append(run_id)
    return closed


def _server_down(uri: str) -> bool:
    """True when `uri` is a tracking server that does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
            return reply.status != 200
    except (urllib.error.URLError, OSError):
        return True


def wait_seconds() -> float:
    try:
        return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT))
    except ValueError:
        raise McisError(f"{WAIT_ENV} must be a number of seconds, got {os.environ[WAIT_ENV]!r}") from None


class Tracker:
    """Logging handle for one MLflow run."""

    def __init__(self, mlc, run_id: str, flush_every: int = 50, uri: str | None = None):
        self.client = mlc
        self.run_id = run_id
        self.flush_every = flush_every
        self.uri = uri
        self._buffer: list[Any] = []
        self._spilled: Path | None = None  # a file of unsent metrics, now in the buffer
        self._warned = False
        self._retry_at = 0.0  # monotonic time before which log_metrics does not try to send

    # metrics -------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._buffer.append(Metric(key, float(value), now, int(step or 0)))
        if len(self._buffer) >= self.flush_every and time.monotonic() >= self._retry_at:
            self.flush()

    def flush(self) -> bool:
        """Send buffered metrics; on failure keep them for the next try and say so once.

        A failed send costs seconds of HTTP retries, so after one, `log_metrics` keeps buffering
        for RETRY_SECONDS instead of stalling every training step; an explicit flush always tries.
        """
        while self._buffer:
            chunk = self._buffer[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - any transport error keeps the buffer
                if not self._warned:
                    print(f"warning: tracking server not answering ({type(exc).__name__}); "
                          "metrics are buffered and sent when it is back", file=sys.stderr)
                    self._warned = True
                del self._buffer[: max(0, len(self._buffer) - MAX_BUFFER)]
                self._retry_at = time.monotonic() + RETRY_SECONDS
                return False
            del self._buffer[: len(chunk)]
        if self._spilled is not None:
            self._spilled.unlink(missing_ok=True)
            self._spilled = None
        if self._warned:
            print("tracking server is back: buffered metrics sent", file=sys.stderr)
            self._warned = False
        return True

    def spill(self, path: Path) -> int:
        """Write the metrics that could not be sent to `path`, for a resume of the run to send."""
        if not self._buffer:
            return 0
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n"
                                   for m in self._buffer))
        return len(self._buffer)

    def replay(self, path: Path) -> int:
        """Queue the metrics an earlier process of this run spilled; the file goes once they are sent."""
        from mlflow.entities import Metric

        if not path.is_file():
            return 0
        lines = path.read_text().splitlines()
        self._buffer[:0] = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in map(json.loads, lines)]
        self._spilled = path
        self.flush()
        return len(lines)

    def _send(self, what: str, call, *args, **kwargs):
        """One client call. While a tracking server is away it is retried until the server is
        back or MCIS_TRACKING_WAIT seconds have passed; then a one-line error (local files stay)."""
        deadline = None
        while True:
            try:
                result = call(*args, **kwargs)
            except McisError:
                raise
            except Exception:  # noqa: BLE001 - a transport error if the server fails its health check
                if not (self.uri and _server_down(self.uri)):
                    raise
                wait = wait_seconds()
                if deadline is None:
                    deadline = time.monotonic() + wait
                    print(f"warning: tracking server {self.uri} not answering while logging {what}; "
                          f"waiting up to {wait:.0f} s for it to come back ({WAIT_ENV})", file=sys.stderr)
                if time.monotonic() >= deadline:
                    raise McisError(
                        f"tracking server {self.uri} did not answer for {wait:.0f} s while logging "
                        f"{what} of run {self.run_id}; the local outputs are kept: once it is back, "
                        f"start the command again (classify and segment: --resume {self.run_id})"
                    ) from None
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                continue
            if deadline is not None:
                print(f"tracking server is back: {what} logged", file=sys.stderr)
            return result

    # params, tags, artifacts ---------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
        existing = self._send("params", self.client.get_run, self.run_id).data.params
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self._send("params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self._send(f"tag {key}", self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; the metrics logged so far are sent first, so that a run killed after a
        checkpoint has every metric of the steps that its resume will not redo."""
        self.flush()
        self._send(Path(path).name, self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._send(f"{Path(folder).name}/", self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._send(name, self.client.log_text, self.run_id, text, name)

    def log_dict(self, data: dict, name: str) -> None:
        self._send(name, self.client.log_dict, self.run_id, data, name)

    def log_figure(self, figure, name: str) -> None:
        self._send(name, self.client.log_figure, self.run_id, figure, name)

    def log_image(self, image, name: str) -> None:
        """`image`: an HxW(x3) uint8 array or a PIL image, saved as `name`.png."""
        from PIL import Image

        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / (Path(name).name + ".png")
            pil.save(path)
            folder = str(Path(name).parent)
            self._send(path.name, self.client.log_artifact, self.run_id, str(path),
                       None if folder == "." else folder)

    def log_onnx_model(self, model_proto, name: str, input_example, registered_name: str | None = None,
                       serving: str = "cpu"):
        """Log an ONNX model with a signature whose batch, height and width stay dynamic."""
        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "input")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1), "logits")]),
        )
        with mlflow.start_run(run_id=self.run_id):
            return mlflow.onnx.log_model(
                model_proto,
                name=name,
                signature=signature,
                input_example={"input": input_example},
                registered_model_name=registered_name,
                onnx_execution_providers=SERVING_PROVIDERS[serving],
                pip_requirements=serving_requirements(serving),
                # one file, as `mcis export` writes it: onnx creates external data files 0600
                save_as_external_data=False,
            )

    def log_serving_model(self, onnx_path: Path, name: str, example_image: bytes,
                          registered_name: str | None, serving: str = "cpu"):
        """Log (and register) the served model: mcis_cli/pyfunc_model.py as models-from-code, the
        .onnx file as its artifact, and the torch-free serving code in its code_paths, so an
        environment built from its requirements alone (`--env-manager virtualenv`,
        `mlflow models build-docker`) serves it without mcis installed."""
        import shutil

        import mlflow
        import pandas as pd
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
        from mlflow.types.schema import Array

        from mcis_cli import serving as serving_code

        package = Path(serving_code.__file__).parent
        signature = ModelSignature(
            inputs=Schema([ColSpec("binary", "image")]),
            outputs=Schema([ColSpec(Array(Array(DataType.long)), "mask"),  # HxW class indices
                            ColSpec(Array(DataType.double), "scores", required=False)]),
            params=ParamSchema([ParamSpec("scores", "boolean", False)]),
        )
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=self.run_id):
            code = Path(tmp) / "mcis_cli"
            for relative in serving_code.SERVING_CODE:
                (code / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(package / relative, code / relative)
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(package / "pyfunc_model.py"),
                artifacts={"onnx": str(onnx_path)},
                code_paths=[str(code)],
                signature=signature,
                input_example=pd.DataFrame({"image": [example_image]}),
                model_config={"providers": SERVING_PROVIDERS[serving]},
                pip_requirements=serving_requirements(serving),
                registered_model_name=registered_name,
            )

    def set_model_version_tag(self, name: str, version: str, key: str, value: Any) -> None:
        self.client.set_model_version_tag(name, version, key, str(value))

    def latest_model_version(self, name: str) -> str:
        versions = self.client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'")
        return max((v.version for v in versions), key=int)


class NullTracker(Tracker):
    """Stands in on ranks other than 0: every call is accepted and nothing is sent."""

    def __init__(self, run_id: str = ""):
        self.run_id = run_id

    def __getattribute__(self, name: str):
        if name == "run_id":
            return object.__getattribute__(self, name)
        return lambda *args, **kwargs: None


def download_model(uri: str) -> Path:
    """Local .onnx file behind a registry URI such as `models:/mcis-deeplab/3` (read in place
    from a local store, downloaded from a server)."""
    import mlflow

    _require_store(None, f"model {uri} not found in the registry")
    client()
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - mlflow raises different types per store
        raise McisError(
            f"model {uri} not found in the registry at {tracking_uri()} ({type(exc).__name__}); "
            "check the name and version, e.g. in `mcis ui`"
        ) from None
    found = sorted(folder.rglob("*.onnx"))  # the served model keeps it under artifacts/
    if not found:
        raise McisError(f"model {uri} holds no .onnx file; register one with `mcis export`")
    return found[0]


def serving_requirements(serving: str) -> list[str]:
    """Pinned requirements of a served model: this environment's versions of what the serving
    code imports, and the onnxruntime package of the `serving` variant."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "pandas", "pillow")] + [ONNXRUNTIME[serving]]


def workdir(cfg: Config, run_id: str) -> Path:
    """Local folder of a run: stages write here, then log it as artifacts."""
    path = Path(cfg.output_dir) / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Nest:
    """Where a pipeline puts a stage's run: under the parent run, named and tagged as its step."""

    parent: str
    step: str
    tags: dict[str, str] = field(default_factory=dict)


def chain_role(stage: str, cfg: Config, source: SourceRun | None) -> str:
    """The chain a new run continues: its source's, else BASELINE for plain CAM, else METHOD."""
    if source is not None and source.role != METHOD:
        return source.role
    if (stage == "classify" and cfg.classify.method == "cam") or (stage == "localize" and cfg.localize.method == "cam"):
        return BASELINE
    return METHOD


@contextmanager
def stage_run(
    cfg: Config,
    stage: str,
    *,
    source: SourceRun | None = None,
    role: str | None = None,
    resume: str | None = None,
    parent: Nest | None = None,
    run_name: str | None = None,
    enabled: bool = True,
) -> Iterator[Tracker]:
    """Open (or with `resume`, reopen) a run of `stage`; mark it FAILED/KILLED on error.

    The run is tagged with its source and its role (by default the source's chain, see
    `chain_role`), so that the next stage's `resolve_run` follows the method, never a baseline.
    The run records which process holds it open (PROCESS_TAG), and its local folder
    output_dir/<run id> is locked while it is open (by output_dir/.<run id>.lock).
    First, every run of the experiment left RUNNING by a process that is gone (kill -9) is
    marked KILLED; `resume` refuses a run that a live process still holds.
    """
    if not enabled:
        yield NullTracker(resume or "")
        return
    mlc = client(cfg)
    uri = tracking_uri(cfg)
    with ExitStack() as stack:
        if resume:
            existing = _get_run(mlc, resume, cfg)
            if existing.data.tags.get(STAGE_TAG) != stage:
                raise McisError(
                    f"--resume {resume} is a {existing.data.tags.get(STAGE_TAG)!r} run, not a {stage!r} run"
                )
            close_dead_runs(mlc, existing.info.experiment_id)
            _check_not_open(mlc, resume)
            stack.enter_context(run_lock(cfg, resume, "--resume run"))
            remove_partials(Path(cfg.output_dir) / resume)  # a kill mid-write leaves them
            run_id = resume
            mlc.update_run(run_id, status="RUNNING")
            mlc.set_tag(run_id, PROCESS_TAG, process_identity())
        else:
            exp = experiment_id(mlc, cfg)
            close_dead_runs(mlc, exp)
            tags = {
                STAGE_TAG: stage,
                SOURCE_TAG: source.run_id if source else "",
                ROLE_TAG: role or chain_role(stage, cfg, source),
                PROCESS_TAG: process_identity(),
                "mcis.dataset": cfg.data.root,
                "mcis.dataset_fingerprint": dataset_fingerprint(cfg.data.root),
                "mlflow.source.git.commit": git_commit(),
                "mlflow.source.name": "mcis " + stage,
            }
            if parent:
                tags |= {"mlflow.parentRunId": parent.parent, STEP_TAG: parent.step, **parent.tags}
            run = mlc.create_run(exp, tags=tags, run_name=run_name or (parent.step if parent else stage))
            run_id = run.info.run_id
        tracker = Tracker(mlc, run_id, cfg.tracking.flush_every, uri)
        unsent = Path(cfg.output_dir) / run_id / UNSENT
        try:
            if resume:
                tracker.replay(unsent)
            else:  # a fresh run's folder: only unwritable storage can make this fail
                stack.enter_context(run_lock(cfg, run_id, "output_dir"))
                tracker.log_params(cfg.flat())
                tracker.log_text(cfg.to_yaml(), "config.yaml")
            yield tracker
        except BaseException as exc:
            if not tracker.flush():
                try:
                    if tracker.spill(unsent):
                        print(f"note: {len(tracker._buffer)} metrics that could not be sent are kept "
                              f"in {unsent}; a --resume of the run sends them", file=sys.stderr)
                except OSError:
                    pass
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            try:
                mlc.set_terminated(run_id, status=status)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        _final_flush(tracker, uri)
        tracker._send("the run's end", mlc.set_terminated, run_id, status="FINISHED")


def run_lock(cfg: Config, run_id: str, what: str):
    """The lock of a run's local folder, held while the run is open (a file beside it)."""
    return exclusive_file(Path(cfg.output_dir) / run_id, what)


def _check_not_open(mlc, run_id: str) -> None:
    """Refuse to reopen a run that a live process on this host still has open."""
    run = mlc.get_run(run_id)
    holder = run.data.tags.get(PROCESS_TAG, "")
    if run.info.status != "RUNNING" or not holder:
        return
    alive = process_alive(holder)
    if alive:
        raise McisError(f"run {run_id} is still open in process {holder.rsplit(':', 2)[1]}; wait for it "
                        "to end (or stop it) before resuming")
    if alive is None:
        print(f"warning: run {run_id} is marked RUNNING by a process on {holder.rsplit(':', 2)[0]}, "
              "which cannot be checked from here; resuming it anyway", file=sys.stderr)


def _final_flush(tracker: Tracker, uri: str) -> None:
    """Send what is buffered, waiting for a server that is away (MCIS_TRACKING_WAIT seconds)."""
    deadline = time.monotonic() + wait_seconds()
    while not tracker.flush():
        if time.monotonic() >= deadline or not _server_down(uri):
            raise McisError(f"run {tracker.run_id}: {len(tracker._buffer)} buffered metrics could not be "
                            f"sent to the tracking server at {uri}; its local outputs are kept")
        time.sleep(2.0)


def _get_run(mlc, run_id: str, cfg: Config):
    try:
        return mlc.get_run(run_id)
    except Exception:  # noqa: BLE001 - mlflow raises different types per store
        raise McisError(f"run {run_id!r} not found in the tracking store {tracking_uri(cfg)}") from None


@dataclass
class SourceRun:
    """A finished run whose artifacts feed the next stage."""

    run_id: str
    stage: str
    artifact_uri: str
    cache_root: Path
    tags: dict[str, str]
    metrics: dict[str, float]

    def fetch(self, artifact_path: str = "") -> Path:
        """Local path of an artifact: read in place from a local store, else downloaded once.

        MLflow writes `a/b/file` to `<dst>/file`, so the download goes to a temporary folder
        beside the target and is renamed into place: a killed download leaves no partial file.
        """
        parsed = urlparse(self.artifact_uri)
        if parsed.scheme in ("", "file"):
            local = Path(unquote(parsed.path)) / artifact_path
            if local.exists():
                return local
        target = self.cache_root / self.run_id / artifact_path
        if not target.exists():
            import mlflow

            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as tmp:
                try:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=self.run_id, artifact_path=artifact_path or None, dst_path=tmp
                    )
                except Exception as exc:  # noqa: BLE001
                    raise McisError(
                        f"run {self.run_id} has no artifact {artifact_path!r} ({type(exc).__name__})"
                    ) from None
                try:
                    os.replace(local, target)
                except OSError:
                    if not target.exists():  # else another process fetched it meanwhile
                        raise
        return target

    def has(self, artifact_path: str) -> bool:
        """Whether the run holds the artifact file `artifact_path` (nothing is downloaded)."""
        from mlflow.tracking import MlflowClient

        parent = str(Path(artifact_path).parent)  # the store `resolve_run` set, as `fetch` uses
        listed = MlflowClient().list_artifacts(self.run_id, None if parent == "." else parent)
        return any(item.path == artifact_path and not item.is_dir for item in listed)

    def local_or_fetched(self, local: Path, artifact_path: str) -> Path | None:
        """`local` when that file exists (the run's own folder), else the artifact when the run
        holds it, else None (a run killed before it logged one)."""
        if local.is_file():
            return local
        return self.fetch(artifact_path) if self.has(artifact_path) else None

    @property
    def role(self) -> str:
        """METHOD, BASELINE, CEILING or ABLATION; runs logged before roles were tagged: by labels."""
        return self.tags.get(ROLE_TAG) or (CEILING if self.tags.get(LABELS_TAG) == "gt" else METHOD)

    def config(self) -> Config:
        return load_logged(self.fetch("config.yaml"))

    def require_same(self, cfg: Config, section: str) -> None:
        """A resume continues the run as it was logged: a changed `section` setting needs a new run."""
        stored = getattr(self.config(), section).model_dump()
        changed = [key for key, value in getattr(cfg, section).model_dump().items() if stored.get(key) != value]
        if changed:
            raise McisError(f"--resume {self.run_id}: {section}.{changed[0]} is {stored.get(changed[0])!r} in "
                            f"that run; resume with the run's own config, or start a new run to change it")


def resolve_run(cfg: Config, stages: str | tuple[str, ...], run_id: str | None = None) -> SourceRun:
    """A stage's input, said on stderr: the run given by id (checked to be of one of `stages`),
    else the newest finished run of the method's own chain (ROLE_TAG method), never a baseline,
    an ablation variant or the fully supervised ceiling, however recent."""
    stages = (stages,) if isinstance(stages, str) else stages
    if run_id:
        source = get_run(cfg, run_id, stages)
        why = "as given" + ("" if source.role == METHOD else f"; a {source.role} run")
    else:
        source, why = _newest_method_run(cfg, stages)
    console.print(f"input: {source.stage} run {source.run_id} ({why})", highlight=False, soft_wrap=True)
    return source


def get_run(cfg: Config, run_id: str, stages: str | tuple[str, ...]) -> SourceRun:
    """The run `run_id`, checked to be of one of `stages`."""
    stages = (stages,) if isinstance(stages, str) else stages
    _require_store(cfg, f"run {run_id} not found")
    run = _get_run(client(cfg), run_id, cfg)
    stage = run.data.tags.get(STAGE_TAG)
    if stage not in stages:
        raise McisError(f"run {run_id} is a {stage!r} run; this command needs a {' or '.join(stages)} run")
    return _source(cfg, run)


def _newest(mlc, experiment_id: str, stages: tuple[str, ...], clause: str = ""):
    """The newest FINISHED run of any of `stages` matching the extra filter `clause`, or None."""
    runs = []
    for stage in stages:  # tags take no IN in MLflow search
        runs += mlc.search_runs(
            [experiment_id], f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'{clause}",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
    return max(runs, key=lambda r: r.info.start_time, default=None)


def _newest_method_run(cfg: Config, stages: tuple[str, ...]) -> tuple[SourceRun, str]:
    """The newest finished method run of `stages`, and why it was chosen (which pipeline step it
    is, which newer run of another chain it passed over)."""
    _require_store(cfg, f"no finished {' or '.join(stages)} run")
    mlc = client(cfg)
    name = experiment_name(cfg)
    experiment = mlc.get_experiment_by_name(name)
    found = experiment and _newest(mlc, experiment.experiment_id, stages, f" and tags.`{ROLE_TAG}` = '{METHOD}'")
    if not found:
        raise McisError(
            f"no finished {' or '.join(stages)} run of the method in experiment {name!r} at "
            f"{tracking_uri(cfg)}; run `mcis {stages[0]}` first or pass --from-run RUN_ID"
        )
    source = _source(cfg, found)
    step = source.tags.get(STEP_TAG)
    why = "the newest finished run of the method" + (
        f": step {step} of pipeline run {source.tags.get('mlflow.parentRunId')}" if step else "")
    newest = _newest(mlc, experiment.experiment_id, stages)
    if newest.info.run_id != source.run_id:
        role = newest.data.tags.get(ROLE_TAG, "untagged")
        why += f"; the newer {role} run {newest.info.run_id} is passed over (--from-run takes it)"
    return source, why


def _source(cfg: Config, run) -> SourceRun:
    return SourceRun(run.info.run_id, run.data.tags.get(STAGE_TAG, ""), run.info.artifact_uri,
                     Path(cfg.output_dir) / "cache", dict(run.data.tags), dict(run.data.metrics))


def find_runs(cfg: Config, stage: str, finished: bool = True, **tags: str) -> list[SourceRun]:
    """Runs of `stage` in the config's experiment carrying the given tags, newest first:
    the FINISHED ones, or with finished=False the ones that did not finish."""
    if _missing_store(cfg):
        return []
    mlc = client(cfg)
    experiment = mlc.get_experiment_by_name(experiment_name(cfg))
    if experiment is None:
        return []
    status = "= 'FINISHED'" if finished else "!= 'FINISHED'"
    clauses = [f"tags.`{STAGE_TAG}` = '{stage}'", f"attributes.status {status}"]
    clauses += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = mlc.search_runs(
        [experiment.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"]
    )
    return [_source(cfg, r) for r in runs]


def finished_children(cfg: Config, parent_id: str, key_tag: str) -> dict[str, SourceRun]:
    """FINISHED nested runs of `parent_id`, keyed by their `key_tag` (oldest wins)."""
    mlc = client(cfg)
    parent = _get_run(mlc, parent_id, cfg)
    runs = mlc.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return {r.data.tags[key_tag]: _source(cfg, r) for r in runs if key_tag in r.data.tags}
