"""Tracking against a real `mlflow server` (HTTP, proxied artifacts) and the default sqlite store.

The server is started once per module (`tests.servers.mlflow_server`); the buffering test stops
and restarts it on the same port and database, as a flaky team server would.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mcis_cli import engine, provenance, tracking
from mcis_cli.cli import app
from mcis_cli.config import Config
from mcis_cli.errors import McisError
from tests import servers

mlflow_server = servers.mlflow_server  # module-scoped fixtures
sqlite_template = servers.sqlite_template

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
STEPS = 100


def make_cfg(tmp_path: Path, experiment: str, flush_every: int = 50) -> Config:
    """A config whose dataset is one list file (enough for the fingerprint) and outputs in tmp."""
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2007_000032\n2007_000039\n")
    return Config.model_validate({
        "name": "tracking-test", "output_dir": str(tmp_path / "runs"), "data": {"root": str(root)},
        "tracking": {"experiment": experiment, "flush_every": flush_every},
    })


@pytest.fixture(params=[pytest.param("server", marks=pytest.mark.slow), "sqlite"])
def store(request, tmp_path, monkeypatch) -> str:
    """The tracking URI a test logs to: the module's server, or ./mlflow.db in a fresh tmp dir."""
    monkeypatch.chdir(tmp_path)
    if request.param == "server":
        server = request.getfixturevalue("mlflow_server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        return server.uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(request.getfixturevalue("sqlite_template"), tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def poly(step: int) -> float:
    return 0.01 * (1 - step / STEPS) ** 0.9


def test_stage_run_logs_everything_and_reads_back(store, tmp_path, request):
    cfg = make_cfg(tmp_path, request.node.name)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01weights")
    source = tracking.SourceRun("abc123", "classify", "", tmp_path, {tracking.ROLE_TAG: tracking.BASELINE}, {})
    with engine.stage_run(cfg, "localize", source=source) as tracker:
        sent, send = [], tracker.client.log_batch

        def counting(run_id, **batch):
            sent.append(batch)
            return send(run_id, **batch)

        tracker.client.log_batch = counting
        for step in range(STEPS):
            tracker.log_metrics({"loss/total": 1.0 / (step + 1), "lr": poly(step)}, step=step)
        tracker.log_artifact(weights, "checkpoints")
    assert len(sent) <= 2 * STEPS // cfg.tracking.flush_every + 1, "metrics were not batched"

    mlc = MlflowClient(store)
    run = mlc.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    history = mlc.get_metric_history(tracker.run_id, "lr")
    assert [m.step for m in history] == list(range(STEPS))
    assert [m.value for m in history] == pytest.approx([poly(s) for s in range(STEPS)])
    assert len(mlc.get_metric_history(tracker.run_id, "loss/total")) == STEPS

    flat = cfg.flat()
    assert run.data.params.keys() == flat.keys() | {"world_size"}  # the engine adds how many processes ran
    for key, value in flat.items():
        logged = run.data.params[key]
        assert (logged if isinstance(value, str) else json.loads(logged)) == value, key

    tags = run.data.tags
    assert tags["mcis.stage"] == "localize"
    assert tags["mcis.source_run"] == "abc123"
    assert tags["mcis.role"] == "baseline"  # a run continues its source's chain
    assert tags["mcis.dataset_fingerprint"] == provenance.dataset_fingerprint(cfg.data.root)
    assert len(tags["mcis.dataset_fingerprint"]) == 16
    assert tags["mlflow.source.git.commit"]
    artifacts = {a.path for a in mlc.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts

    source = tracking.resolve_run(cfg, "localize", tracker.run_id)
    assert [p.name for p in source.fetch("checkpoints").iterdir()] == ["weights.bin"]
    fetched = source.fetch("checkpoints/weights.bin")
    assert fetched.read_bytes() == weights.read_bytes()
    if store.startswith("http"):  # proxied by the server: downloaded into the run cache
        assert fetched.is_relative_to(Path(cfg.output_dir) / "cache")
    else:  # local store: read in place, nothing copied
        assert fetched.is_relative_to(tmp_path / "mlruns")
    assert source.config() == cfg


def test_resolve_latest_finished_run(store, tmp_path, request):
    cfg = make_cfg(tmp_path, request.node.name)
    with pytest.raises(McisError, match="no finished classify run"):
        tracking.resolve_run(cfg, "classify")
    ids = []
    for _ in range(2):
        with engine.stage_run(cfg, "classify") as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
        ids.append(tracker.run_id)
    with pytest.raises(RuntimeError), engine.stage_run(cfg, "classify"):  # newer, but FAILED
        raise RuntimeError("boom")
    with engine.stage_run(cfg, "evaluate"):  # newer, finished, other stage
        pass
    latest = tracking.resolve_run(cfg, "classify")
    assert latest.run_id == ids[1] and latest.stage == "classify"
    assert latest.metrics == {"loss": 1.0}
    assert tracking.resolve_run(cfg, ("classify", "evaluate")).stage == "evaluate"
    assert [r.run_id for r in tracking.find_runs(cfg, "classify")] == ids[::-1]


def test_default_input_is_the_method_run_never_a_baseline_ablation_or_ceiling(store, tmp_path, request, capsys):
    cfg = make_cfg(tmp_path, request.node.name)
    cam = cfg.model_copy(update={"classify": cfg.classify.model_copy(update={"method": "cam"})})
    with engine.stage_run(cfg, "pipeline") as parent:
        pass
    with engine.stage_run(cfg, "classify", parent=tracking.Nest(parent.run_id, "classify")) as method:
        pass
    with engine.stage_run(cam, "classify") as baseline:  # newer, plain CAM
        pass
    nest = tracking.Nest(parent.run_id, "ablation/coatt/seed1/classify", {tracking.ROLE_TAG: tracking.ABLATION})
    with engine.stage_run(cfg, "classify", parent=nest) as ablation:  # newer still
        pass
    capsys.readouterr()
    chosen = tracking.resolve_run(cfg, "classify")
    said = capsys.readouterr().err
    assert chosen.run_id == method.run_id
    assert f"step classify of pipeline run {parent.run_id}" in said
    assert f"the newer ablation run {ablation.run_id} is passed over" in said

    mlc = MlflowClient(store)
    nested = mlc.get_run(ablation.run_id)
    assert nested.info.run_name == nest.step and nested.data.tags[tracking.STEP_TAG] == nest.step
    assert mlc.get_run(baseline.run_id).data.tags[tracking.ROLE_TAG] == tracking.BASELINE
    with engine.stage_run(cfg, "localize", source=tracking.get_run(cfg, baseline.run_id, "classify")) as maps:
        pass  # continues the baseline's chain
    assert mlc.get_run(maps.run_id).data.tags[tracking.ROLE_TAG] == tracking.BASELINE
    with pytest.raises(McisError, match="no finished localize run of the method"):
        tracking.resolve_run(cfg, "localize")
    with engine.stage_run(cfg, "segment", role=tracking.CEILING):
        pass
    with pytest.raises(McisError, match="no finished segment run of the method"):
        tracking.resolve_run(cfg, "segment")
    assert tracking.resolve_run(cfg, "localize", maps.run_id).run_id == maps.run_id  # on purpose
    assert "as given; a baseline run" in capsys.readouterr().err


@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_raising_run_is_marked(store, tmp_path, request, error, status):
    cfg = make_cfg(tmp_path, request.node.name)
    with pytest.raises(error), engine.stage_run(cfg, "segment") as tracker:
        tracker.log_metrics({"loss": 0.5}, step=3)  # buffered, must still arrive
        raise error()
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.metrics == {"loss": 0.5}


# ---- bad input through the command line --------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(app, [*args, "--config", str(CONFIG)])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_cli_unknown_run_id(store, tmp_path):
    result = invoke("localize", "--from-run", "0123456789abcdef0123456789abcdef",
                    "--set", f"output_dir={tmp_path / 'runs'}")
    assert_one_line_error(result, "0123456789abcdef0123456789abcdef", "not found", store)


def test_cli_run_of_the_wrong_stage(store, tmp_path, request):
    cfg = make_cfg(tmp_path, "toy")
    with engine.stage_run(cfg, "evaluate") as tracker:
        pass
    with pytest.raises(McisError, match=f"run {tracker.run_id} is a 'evaluate' run; this command needs a classify run"):
        tracking.resolve_run(cfg, "classify", tracker.run_id)
    result = invoke("localize", "--from-run", tracker.run_id, "--set", f"output_dir={tmp_path / 'runs'}")
    assert_one_line_error(result, tracker.run_id, "'evaluate'", "classify")


def test_cli_unreachable_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    result = invoke("localize", "--set", f"output_dir={tmp_path / 'runs'}")
    assert_one_line_error(result, "unreachable", uri)
    assert time.monotonic() - start < 30


# ---- a server that goes away mid-run -----------------------------------------------------------
@pytest.mark.slow
def test_metrics_are_buffered_while_the_server_is_down(mlflow_server, tmp_path, monkeypatch, capsys, request):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    cfg = make_cfg(tmp_path, request.node.name, flush_every=10)
    try:
        with engine.stage_run(cfg, "segment") as tracker:
            for step in range(20):
                tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": poly(step)}, step=step)
            mlflow_server.stop()
            start = time.monotonic()
            for step in range(20, 60):
                tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": poly(step)}, step=step)
            stalled = time.monotonic() - start
            assert not tracker.flush()  # still down: kept, not lost
            err = capsys.readouterr().err
            assert err.count("warning: tracking server not answering") == 1, err
            mlflow_server.start()
            assert tracker.flush()
            assert "tracking server is back" in capsys.readouterr().err
    finally:
        if mlflow_server.proc is None:
            mlflow_server.start()
    # one failed send (a few seconds of HTTP retries), not one per step
    assert stalled < 20, f"training stalled {stalled:.1f} s while the server was down"
    mlc = MlflowClient(mlflow_server.uri)
    assert mlc.get_run(tracker.run_id).info.status == "FINISHED"
    history = mlc.get_metric_history(tracker.run_id, "lr")
    assert [m.step for m in history] == list(range(60))
    assert [m.value for m in history] == pytest.approx([poly(s) for s in range(60)])

