"""The tracking server goes away in the middle of `mcis segment` (a real `mlflow server` that the
test stops, then starts again on the same port and database).

The documented behaviour: training goes on while metrics are buffered in memory; the next file
upload (a checkpoint) waits for the server, up to MCIS_TRACKING_WAIT seconds. If the server is
back in time, the buffer is sent and the run finishes as if nothing happened. If not, the run stops
with one line naming the run and how to resume; the local checkpoint and the metrics that could
not be sent are kept, and `--resume` later sends them and finishes the run, so nothing is lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mcis_cli import tracking
from mcis_cli.checkpoints import load_checkpoint
from mcis_cli.errors import McisError
from tests import servers
from tests.reliability import procs

mlflow_server = servers.mlflow_server  # module-scoped fixtures
sqlite_template = servers.sqlite_template

ITERS, EVERY = 32, 8  # metrics are sent at each checkpoint (flush_every is out of reach)


def _config(tmp: Path, toy_root: Path) -> Path:
    return procs.write_config(
        tmp / "segment.yaml", name=tmp.name, device="cpu", output_dir="runs", **{
            "data.root": str(toy_root), "data.workers": 0, "segment.width": 0.125,
            "segment.pretrained": False, "segment.batch_size": 4, "segment.crop": 41,
            "segment.iters": ITERS, "segment.log_every": 1, "segment.val_every": 0,
            "segment.checkpoint_every": EVERY, "tracking.flush_every": 100_000,
        })


def _uploaded_iteration(server, run_id: str) -> int:
    """The iteration of the last.pt the server holds for the run (read from its artifact store)."""
    for path in (server.cwd / "mlartifacts").glob(f"*/{run_id}/artifacts/checkpoints/last.pt"):
        try:
            return load_checkpoint(path)["iteration"]
        except McisError:  # being written
            return 0
    return 0


def _start_and_stop_the_server(server, tmp: Path, config: Path, wait: str):
    """Start segment; once the server holds a seeded checkpoint, freeze the training, stop the
    server and let the training go on, so that every step up to the next checkpoint meets a
    server that is gone. Frozen between a checkpoint's upload and the next one's metrics (checked
    on the server's own files), the run always has metrics to buffer. Returns (process, log,
    run id, the checkpoint iteration, the environment)."""
    environ = procs.env(server.uri, **{tracking.WAIT_ENV: wait})
    log = tmp / "segment.log"
    proc = procs.start(["segment", "--config", config, "--labels", "gt"], tmp, environ, log)
    mlc = MlflowClient(server.uri)

    def run_id():
        found = mlc.get_experiment_by_name(tmp.name)
        runs = mlc.search_runs([found.experiment_id]) if found else []
        return runs[0].info.run_id if runs else None

    def last_step(run: str) -> int:
        return max((m.step for m in mlc.get_metric_history(run, "loss")), default=-1)

    run = procs.wait_until(run_id, proc, log, "the run")
    checkpoint = procs.kill_point(f"outage:{tmp.name}", 1, ITERS // EVERY - 2) * EVERY
    while True:
        procs.wait_until(lambda c=checkpoint: _uploaded_iteration(server, run) >= c, proc, log,
                         f"the upload of checkpoint {checkpoint}", poll=0.01, freeze=True)
        uploaded = _uploaded_iteration(server, run)
        if last_step(run) < uploaded + EVERY - 1:  # the next checkpoint's metrics are not sent yet
            break
        os.killpg(proc.pid, signal.SIGCONT)  # the poll was late: take the next checkpoint
        checkpoint = uploaded + EVERY
        assert checkpoint < ITERS, "the training outran the test"
    try:
        server.stop()
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    return proc, log, run, uploaded, environ


def _checkpoint_iteration(tmp: Path, run_id: str) -> int:
    path = tmp / "runs" / run_id / "checkpoints" / "last.pt"
    return load_checkpoint(path)["iteration"] if path.is_file() else 0


@pytest.mark.slow
def test_training_goes_on_and_the_buffer_is_sent_when_the_server_is_back(mlflow_server, tmp_path, toy_root):
    config = _config(tmp_path, toy_root)
    proc, log, run_id, step, _ = _start_and_stop_the_server(mlflow_server, tmp_path, config, "300")
    try:
        # the server is down: training still reaches its first checkpoint, past the stop
        procs.wait_until(lambda: _checkpoint_iteration(tmp_path, run_id) > step, proc, log,
                         "a checkpoint while the server is down")
        time.sleep(3)
        assert proc.poll() is None, f"the run gave up while the server was down:\n{procs.tail(log)}"
    finally:
        mlflow_server.start()
    assert proc.wait(procs.TIMEOUT) == 0, procs.tail(log)
    output = log.read_text()
    assert "metrics are buffered" in output and "is back" in output, output
    mlc = MlflowClient(mlflow_server.uri)
    assert mlc.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in mlc.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(ITERS)), "metrics were lost or sent twice"
    assert {a.path for a in mlc.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/model.pt"}
    procs.record("segment (server outage)", f"server stopped after checkpoint {step}", resumed=False,
                 lost="nothing")


@pytest.mark.slow
def test_a_server_that_stays_away_stops_the_run_in_one_line_and_resume_loses_nothing(
        mlflow_server, tmp_path, toy_root):
    config = _config(tmp_path, toy_root)
    proc, log, run_id, step, environ = _start_and_stop_the_server(mlflow_server, tmp_path, config, "3")
    try:
        code = proc.wait(procs.TIMEOUT)
    finally:
        mlflow_server.start()
    output = log.read_text()
    assert code == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    flat = " ".join(output.split())
    for needle in ("did not answer for 3 s", f"run {run_id}", f"--resume {run_id}"):
        assert needle in flat, output
    assert (tmp_path / "runs" / run_id / tracking.UNSENT).is_file()  # the buffer, kept
    mlc = MlflowClient(mlflow_server.uri)
    assert mlc.get_run(run_id).info.status == "RUNNING"  # nobody could tell the server

    resumed = procs.run(["segment", "--config", config, "--resume", run_id], tmp_path, environ)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"run {run_id} was left RUNNING" in resumed.output  # closed as KILLED, then reopened
    assert mlc.get_run(run_id).info.status == "FINISHED"
    steps = sorted({m.step for m in mlc.get_metric_history(run_id, "loss")})
    assert steps == list(range(ITERS)), "metrics of the outage were lost"
    assert not (tmp_path / "runs" / run_id / tracking.UNSENT).exists()
    procs.record("segment (server gone)", f"server stopped after checkpoint {step}", resumed=True,
                 lost="nothing")
