"""A run while it is open: `create_run` / `reopen_run` give the `Tracker` that logs to it.

Kept apart from the store queries because this is the part with state and failure handling:
step-wise metrics are buffered and sent with `log_batch`, so a remote server is not hit per step;
if the server is unreachable the buffer is kept and sent on the next flush, and a run that fails
keeps what it could not send for its resume. When to open, lock and close a run is the engine's
business (`mcis_cli/engine.py`); this module only talks to the store.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcis_cli.config import Config
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path
from mcis_cli.procs import process_alive, process_identity
from mcis_cli.progress import note
from mcis_cli.tracking.store import (
    BASELINE,
    END_TAG,
    METHOD,
    PROCESS_TAG,
    STAGE_TAG,
    SourceRun,
    client,
    experiment_id,
    lookup_run,
    server_answers,
    tracking_uri,
)

MAX_BUFFER = 100_000  # metrics kept while a server is away
RETRY_SECONDS = 30.0  # after a failed flush, steps only buffer until this much time has passed
WAIT_ENV = "MCIS_TRACKING_WAIT"  # seconds a file upload waits for a server that went away
DEFAULT_WAIT = 600.0
UNSENT = "unsent-metrics.jsonl"  # in the run's folder: metrics a failed run could not send


def _close_dead_runs(mlc, experiment: str) -> list[str]:
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
        note(f"note: {stage} run {run_id} was left RUNNING by process {pid}, which is gone: marked KILLED")
        closed.append(run_id)
    return closed


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

    def _server_down(self) -> bool:
        """True when the run's store is a tracking server that does not answer its health check."""
        return bool(self.uri and self.uri.startswith(("http://", "https://")) and not server_answers(self.uri))

    # metrics -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Metrics logged but not sent yet."""
        return len(self._buffer)

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
                    note(f"warning: tracking server not answering ({type(exc).__name__}); "
                         "metrics are buffered and sent when it is back")
                    self._warned = True
                del self._buffer[: max(0, len(self._buffer) - MAX_BUFFER)]
                self._retry_at = time.monotonic() + RETRY_SECONDS
                return False
            del self._buffer[: len(chunk)]
        if self._spilled is not None:
            self._spilled.unlink(missing_ok=True)
            self._spilled = None
        if self._warned:
            note("tracking server is back: buffered metrics sent")
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

    # the end of the run --------------------------------------------------------------------
    def finish(self) -> None:
        """Send what is buffered, waiting for a server that is away (MCIS_TRACKING_WAIT seconds),
        then mark the run FINISHED."""
        deadline = time.monotonic() + wait_seconds()
        while not self.flush():
            if time.monotonic() >= deadline or not self._server_down():
                raise McisError(f"run {self.run_id}: {self.pending} buffered metrics could not be "
                                f"sent to the tracking server at {self.uri}; its local outputs are kept")
            time.sleep(2.0)
        self._send("the run's end", self.client.set_terminated, self.run_id, status="FINISHED")

    def fail(self, status: str, unsent: Path) -> None:
        """Mark the run `status` (FAILED or KILLED) after an error, without waiting: the metrics
        that cannot be sent now are kept in `unsent`, for a --resume of the run to send. Nothing
        here raises: the error that ended the run matters more."""
        if not self.flush():
            try:
                if self.spill(unsent):
                    note(f"note: {self.pending} metrics that could not be sent are kept "
                         f"in {unsent}; a --resume of the run sends them")
            except OSError:
                pass
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass

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
                if not self._server_down():
                    raise
                wait = wait_seconds()
                if deadline is None:
                    deadline = time.monotonic() + wait
                    note(f"warning: tracking server {self.uri} not answering while logging {what}; "
                         f"waiting up to {wait:.0f} s for it to come back ({WAIT_ENV})")
                if time.monotonic() >= deadline:
                    raise McisError(
                        f"tracking server {self.uri} did not answer for {wait:.0f} s while logging "
                        f"{what} of run {self.run_id}; the local outputs are kept: once it is back, "
                        f"start the command again (classify and segment: --resume {self.run_id})"
                    ) from None
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                continue
            if deadline is not None:
                note(f"tracking server is back: {what} logged")
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

    def log_dataset(self, root: str | Path, digest: str, context: str) -> None:
        """The data folder as an MLflow dataset input (the UI's Datasets column and lineage),
        named after the folder, with the dataset fingerprint as its digest."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        path = Path(root).resolve()
        with warnings.catch_warnings():  # a local path resolves to two equal local sources
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source, name=path.name, digest=digest)._to_mlflow_entity()
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        self._send("the dataset input", self.client.log_inputs, self.run_id, inputs)

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


def create_run(cfg: Config, tags: dict[str, str], run_name: str) -> Tracker:
    """A new run in the config's experiment, held by this process (PROCESS_TAG)."""
    mlc = client(cfg)
    run = mlc.create_run(experiment_id(mlc, cfg), tags=tags | {PROCESS_TAG: process_identity()},
                         run_name=run_name)
    return Tracker(mlc, run.info.run_id, cfg.tracking.flush_every, tracking_uri(cfg))


@contextmanager
def system_metrics(cfg: Config, run_id: str, node: str | None, resumed: bool) -> Iterator[None]:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPUs through NVML where it
    is installed) on `run_id` while the block runs, sampled every `tracking.system_metrics`
    seconds (0: none); under torchrun each rank logs as its own node (`system/<node>/...`)."""
    interval = cfg.tracking.system_metrics
    if not interval:
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resumed,
                                   node_id=node, tracking_uri=tracking_uri(cfg))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def check_resumable(cfg: Config, run_id: str, stage: str) -> None:
    """Refuse to reopen a run of another stage, a finished run, or one a live process holds."""
    existing = lookup_run(client(cfg), run_id, cfg)
    if existing.data.tags.get(STAGE_TAG) != stage:
        raise McisError(f"--resume {run_id} is a {existing.data.tags.get(STAGE_TAG)!r} run, not a {stage!r} run")
    if existing.info.status == "FINISHED":
        raise McisError(f"--resume {run_id}: that {stage} run finished; start a new run instead")
    _check_not_open(existing)


def reopen_run(cfg: Config, run_id: str) -> Tracker:
    """The unfinished run `run_id`, RUNNING again and held by this process."""
    mlc = client(cfg)
    mlc.update_run(run_id, status="RUNNING")
    mlc.set_tag(run_id, PROCESS_TAG, process_identity())
    return Tracker(mlc, run_id, cfg.tracking.flush_every, tracking_uri(cfg))


def close_dead_runs(cfg: Config) -> list[str]:
    """Mark KILLED every run of the config's experiment left RUNNING by a process that is gone."""
    mlc = client(cfg)
    return _close_dead_runs(mlc, experiment_id(mlc, cfg))


def _check_not_open(run) -> None:
    """Refuse to reopen a run that a live process on this host still has open."""
    holder = run.data.tags.get(PROCESS_TAG, "")
    if run.info.status != "RUNNING" or not holder:
        return
    alive = process_alive(holder)
    run_id = run.info.run_id
    if alive:
        raise McisError(f"run {run_id} is still open in process {holder.rsplit(':', 2)[1]}; wait for it "
                        "to end (or stop it) before resuming")
    if alive is None:
        note(f"warning: run {run_id} is marked RUNNING by a process on {holder.rsplit(':', 2)[0]}, "
             "which cannot be checked from here; resuming it anyway")
