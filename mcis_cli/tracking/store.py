"""The tracking store: where it is, whether it answers, and the runs in it.

Everything that reads the store lives here (the tag names, the client, the run queries that find
a stage's input), so that opening a run (`run.py`) and logging models (`models.py`) both ask one
place, and a later stage finds its input with `resolve_run(...)` and reads files with
`SourceRun.fetch(...)`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mcis_cli.config import Config, load_logged
from mcis_cli.errors import McisError
from mcis_cli.progress import note

DEFAULT_URI = "sqlite:///mlflow.db"
STAGE_TAG = "mcis.stage"
SOURCE_TAG = "mcis.source_run"
STEP_TAG = "mcis.step"  # a pipeline's name for the step a nested run is: classify, segment_gt, ...
ROLE_TAG = "mcis.role"  # which chain a run belongs to: one of ROLES
FINGERPRINT_TAG = "mcis.dataset_fingerprint"  # provenance.dataset_fingerprint of the run's data
METHOD_TAG = "mcis.method"  # the method whose chain a run is part of: cam, oaa, oaa+, psa, mcis, ...
METHOD, BASELINE, CEILING, ABLATION = "method", "baseline", "ceiling", "ablation"
LABELS_TAG = "mcis.labels"  # set by segment: "gt" marks the fully supervised ceiling
PROCESS_TAG = "mcis.process"  # "<host>:<pid>:<start>" of the process that has the run open
END_TAG = "mcis.end_reason"  # why a run was closed by someone else than its own process
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow UI's kind


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


def server_answers(url: str, timeout: float = 5, path: str = "/health") -> bool:
    """True when GET <url><path> answers 200: a tracking server's (or `mcis ui`'s) health check;
    any other status, a refused connection or a timeout is False."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


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
    """The MlflowClient of the configured store, made once per process and store: a tracking
    server's health and login are checked when it is made, not at every query."""
    return client_of(tracking_uri(cfg))


@functools.cache
def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    remote = uri.startswith(("http://", "https://"))
    if remote and not server_answers(uri):
        raise McisError(
            f"tracking server unreachable at {uri} (start it, e.g. `mcis ui`, or unset MLFLOW_TRACKING_URI)"
        )
    # "Creating initial MLflow database tables..." would precede every first command's output
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if remote:
        _check_login(mlc, uri)
    return mlc


@contextmanager
def fluent(uri: str) -> Iterator[None]:
    """Point mlflow's module-level API (model logging and model URIs take no client) at `uri`
    for one call; a process may use several stores (tests do), so it is set where it is used."""
    import mlflow

    client_of(uri)  # the checks a client makes
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.name


def experiment_id(mlc, cfg: Config) -> str:
    """The config's experiment, created if new, marked as model training for the MLflow UI."""
    name = experiment_name(cfg)
    found = mlc.get_experiment_by_name(name)
    if found is None:
        return mlc.create_experiment(name, tags={KIND_TAG: TRAINING_KIND})
    if KIND_TAG not in found.tags:  # made by an older mcis or by mlflow itself
        mlc.set_experiment_tag(found.experiment_id, KIND_TAG, TRAINING_KIND)
    return found.experiment_id


def require_store(cfg: Config | None, sought: str) -> None:
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


def lookup_run(mlc, run_id: str, cfg: Config):
    """The MLflow run `run_id`; a one-line error naming the store when there is none."""
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
    status: str = "FINISHED"
    uri: str = ""  # the tracking store it is in (default: the configured one)

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
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as tmp:
                try:
                    local = client_of(self.uri or tracking_uri()).download_artifacts(self.run_id, artifact_path, tmp)
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
        parent = str(Path(artifact_path).parent)
        listed = client_of(self.uri or tracking_uri()).list_artifacts(self.run_id, None if parent == "." else parent)
        return any(item.path == artifact_path and not item.is_dir for item in listed)

    def local_or_fetched(self, local: Path, artifact_path: str) -> Path | None:
        """`local` when that file exists (the run's own folder), else the artifact when the run
        holds it, else None (a run killed before it logged one)."""
        if local.is_file():
            return local
        return self.fetch(artifact_path) if self.has(artifact_path) else None

    @property
    def method(self) -> str | None:
        return self.tags.get(METHOD_TAG)

    @property
    def role(self) -> str:
        """METHOD, BASELINE, CEILING or ABLATION; runs logged before roles were tagged: by labels."""
        return self.tags.get(ROLE_TAG) or (CEILING if self.tags.get(LABELS_TAG) == "gt" else METHOD)

    def config(self) -> Config:
        return load_logged(self.fetch("config.yaml"))


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
    note(f"input: {source.stage} run {source.run_id} ({why})")
    return source


def get_run(cfg: Config, run_id: str, stages: str | tuple[str, ...]) -> SourceRun:
    """The run `run_id`, checked to be of one of `stages`."""
    stages = (stages,) if isinstance(stages, str) else stages
    require_store(cfg, f"run {run_id} not found")
    run = lookup_run(client(cfg), run_id, cfg)
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
    require_store(cfg, f"no finished {' or '.join(stages)} run")
    mlc = client(cfg)
    name = experiment_name(cfg)
    experiment = mlc.get_experiment_by_name(name)
    found = experiment and _newest(mlc, experiment.experiment_id, stages, f" and tags.`{ROLE_TAG}` = '{METHOD}'")
    if not found:
        raise McisError(
            f"no finished {' or '.join(stages)} run of the method in experiment {name!r} at "
            f"{tracking_uri(cfg)}; run `mcis {stages[0].replace('_', ' ')}` first or pass --from-run RUN_ID"
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
                     Path(cfg.output_dir) / "cache", dict(run.data.tags), dict(run.data.metrics), run.info.status,
                     tracking_uri(cfg))


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
    parent = lookup_run(mlc, parent_id, cfg)
    runs = mlc.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return {r.data.tags[key_tag]: _source(cfg, r) for r in runs if key_tag in r.data.tags}
