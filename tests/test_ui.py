"""`mcis ui`: a real MLflow server over the commands' store, seen through REST and headless chromium.

One `mcis ui` process serves the whole module (its start-up is the slow part); the Ctrl-C test
stops it, so it comes last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mcis_cli import engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import Config
from tests import servers

sqlite_template = servers.sqlite_template  # module-scoped fixture
EXPERIMENT = "ui-test"
STEPS = 30
RUNS = {"run-alpha": (0.01, 0.41), "run-beta": (0.02, 0.47)}  # name: (base lr, miou)


@dataclass
class UI:
    proc: subprocess.Popen
    url: str
    home: Path
    log: Path
    runs: dict[str, str]  # name -> run id
    experiment_id: str
    monitored: tuple[str, str]  # (experiment id, run id) of a run with system metrics


def log_run(home: Path, name: str, base_lr: float, miou: float, experiment: str = EXPERIMENT,
            system_metrics: float = 0) -> str:
    cfg = Config.model_validate({"name": experiment, "output_dir": str(home / "runs"), "data": {"root": str(home / "voc")},
                                 "tracking": {"system_metrics": system_metrics}})
    with engine.stage_run(cfg, "segment", run_name=name) as tracker:
        for step in range(STEPS):
            tracker.log_metrics({"lr": base_lr * (1 - step / STEPS) ** 0.9}, step=step)
        tracker.log_metrics({"miou": miou}, step=STEPS)
        time.sleep(4 * system_metrics)  # a few samples
    return tracker.run_id


@pytest.fixture(scope="module")
def ui(tmp_path_factory, sqlite_template):
    """`mcis ui --port <free>` started in a folder whose default store holds two finished runs."""
    home = tmp_path_factory.mktemp("ui")
    shutil.copy(sqlite_template, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs = {name: log_run(home, name, lr, miou) for name, (lr, miou) in RUNS.items()}
        experiment_id = tracking.client().get_experiment_by_name(EXPERIMENT).experiment_id
        monitored_run = log_run(home, "run-monitored", 0.01, 0.4, "ui-monitored", system_metrics=0.2)
        monitored = (tracking.client().get_experiment_by_name("ui-monitored").experiment_id, monitored_run)
    port = servers.free_port()
    log = home / "mcis-ui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    # Ctrl-C's default action, as a terminal's foreground command has it: a suite started in the
    # background of a non-interactive shell inherits SIGINT ignored, and `mcis ui` would too (a
    # handler, unlike an ignored signal, is reset to the default by exec).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mcis_cli.cli", "ui", "--port", str(port)],
                                    cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    url = f"http://127.0.0.1:{port}"
    try:
        servers.wait_http(url + "/health", proc, log)
        deadline = time.monotonic() + 30  # mcis polls /health too, then says so
        while f"MLflow UI ready: {url}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        yield UI(proc, url, home, log, runs, experiment_id, monitored)
    finally:
        servers.stop_group(proc)


@pytest.mark.slow
def test_ui_serves_the_commands_store(ui):
    assert f"MLflow UI ready: {ui.url}" in ui.log.read_text()
    found = servers.json_request(ui.url + "/api/2.0/mlflow/runs/search",
                                 {"experiment_ids": [ui.experiment_id]})
    assert {r["info"]["run_name"]: r["info"]["run_id"] for r in found["runs"]} == ui.runs
    assert all(r["info"]["status"] == "FINISHED" for r in found["runs"])
    run_id = ui.runs["run-alpha"]
    listed = servers.json_request(f"{ui.url}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert "config.yaml" in {f["path"] for f in listed["files"]}
    query = urllib.parse.urlencode({"path": "config.yaml", "run_uuid": run_id})
    with urllib.request.urlopen(f"{ui.url}/get-artifact?{query}", timeout=30) as reply:
        assert f"name: {EXPERIMENT}" in reply.read().decode()
    with urllib.request.urlopen(ui.url + "/", timeout=30) as reply:
        assert "<title>MLflow</title>" in reply.read().decode()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words))
    return found


@pytest.mark.slow
def test_ui_listens_on_loopback_only_by_default(ui):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read the listening sockets from")
    port = int(ui.url.rsplit(":", 1)[1])
    addresses = listening_addresses(port)
    assert addresses == {"127.0.0.1"}, f"mcis ui (no --host) listens on {addresses}"


def render(url: str, profile: Path, needles: list[str], attempts: int = 3) -> str:
    """The DOM chromium renders for `url`, retried while the page is still loading its data."""
    for _ in range(attempts):
        dom, _ = servers.chromium(url, profile, "--virtual-time-budget=30000", "--dump-dom")
        if all(n in dom for n in needles):
            break
    return dom


def screenshot(url: str, profile: Path, path: Path, size: str) -> None:
    _, err = servers.chromium(url, profile, "--virtual-time-budget=30000", f"--window-size={size}",
                              f"--screenshot={path}")
    assert path.is_file() and path.stat().st_size > 10_000, err[-2000:]
    if os.environ.get("MCIS_TEST_ARTIFACTS"):
        target = Path(os.environ["MCIS_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


@pytest.mark.slow
def test_compare_view_in_chromium(ui, tmp_path):
    if servers.chromium_path() is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    ids = json.dumps(list(ui.runs.values()), separators=(",", ":"))
    experiments = json.dumps([ui.experiment_id])
    compare = f"{ui.url}/#/compare-runs?runs={ids}&experiments={experiments}"
    dom = render(compare, tmp_path / "profile", [*RUNS, ">miou<", ">lr<"])
    assert "Comparing 2 Runs" in dom
    for name in RUNS:
        assert f">{name}<" in dom, name
    assert ">miou<" in dom and ">lr<" in dom  # the metric rows (links to their charts)
    assert 'data-unformatted="lr"' in dom  # the parallel-coordinates axis of lr

    chart = (f"{ui.url}/#/metric?runs={ids}&metric=%22lr%22&experiments={experiments}"
             "&plot_metric_keys=%5B%22lr%22%5D&x_axis=step")
    dom = render(chart, tmp_path / "profile", [f"{n} (lr)" for n in RUNS])
    for name in RUNS:
        assert f"{name} (lr)" in dom, name  # one legend entry per run
    assert dom.count('class="trace scatter') >= 2  # one plotted line per run
    assert 'data-unformatted="Step"' in dom

    screenshot(compare, tmp_path / "profile", tmp_path / "mlflow-compare.png", "1600,1800")
    screenshot(chart, tmp_path / "profile", tmp_path / "mlflow-lr-chart.png", "1600,1000")


@pytest.mark.slow
def test_run_page_shows_the_dataset_input_and_the_system_metrics(ui, tmp_path):
    experiment_id, run_id = ui.monitored
    run = servers.json_request(f"{ui.url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    digest = {t["key"]: t["value"] for t in run["data"]["tags"]}["mcis.dataset_fingerprint"]
    page = f"{ui.url}/#/experiments/{experiment_id}/runs/{run_id}"
    dom = render(page, tmp_path / "profile", [f"voc ({digest})"])
    assert f"voc ({digest})" in dom and ">Datasets<" in dom  # the dataset input, named with its digest
    dom = render(page + "/system-metrics", tmp_path / "profile", ["System metrics<"])
    shown = re.search(r"System metrics<.{0,400}?\((\d+)\)<", dom, re.S)
    assert shown and int(shown.group(1)) >= 4, "no system-metric charts"  # CPU, memory, disk, network
    screenshot(page + "/system-metrics", tmp_path / "profile", tmp_path / "mlflow-system-metrics.png", "1400,900")


@pytest.mark.slow
def test_printed_experiment_link_opens_the_training_runs_view(ui, tmp_path):
    found = servers.json_request(f"{ui.url}/api/2.0/mlflow/experiments/get?experiment_id={ui.experiment_id}")
    tags = {t["key"]: t["value"] for t in found["experiment"]["tags"]}
    assert tags[tracking.KIND_TAG] == tracking.TRAINING_KIND
    link = f"{ui.url}/#/experiments/{ui.experiment_id}?workflowType=machine_learning"
    assert f"runs of {EXPERIMENT}: {link}" in ui.log.read_text()
    if servers.chromium_path() is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    dom = render(link, tmp_path / "profile", [f">{n}<" for n in RUNS])
    for name in RUNS:
        assert f">{name}<" in dom, name  # the runs table lists both runs
    assert ">Run Name<" in dom and "matching runs" in dom
    assert "Detect Issues" not in dom  # the GenAI overview's traces toolbar
    screenshot(link, tmp_path / "profile", tmp_path / "mlflow-experiment.png", "1400,900")


# ---- options checked before anything starts ----------------------------------------------------
def test_public_host_needs_expose():
    result = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--port", str(servers.free_port())])
    assert result.exit_code == 2
    assert "--expose" in result.output and "Traceback" not in result.output


def test_expose_warns_and_busy_port_is_an_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--host", "0.0.0.0", "--expose", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert "warning:" in result.output
    assert f"cannot listen on 0.0.0.0:{port}" in result.output and "--port" in result.output


def test_remote_tracking_server_is_its_own_ui(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 0
    assert "http://tracking.example:5000" in result.output and "its UI is there" in result.output


# ---- last: stops the module's server -----------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_exits_0(ui):
    os.killpg(ui.proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    assert ui.proc.wait(60) == 0, servers.tail(ui.log)
    assert "stopping the MLflow UI" in ui.log.read_text()
    assert not servers.port_open(int(ui.url.rsplit(":", 1)[1])), "the mlflow server outlived mcis ui"
