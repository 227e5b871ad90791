"""`mcis ui`: the MLflow UI over the store the commands write to, on loopback unless told otherwise.

The server is `mlflow server` from this environment, run as a child in its own process group so
that Ctrl-C (or SIGTERM) stops it and every worker it forked, and `mcis ui` exits 0.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from rich.console import Console

from mcis_cli import tracking
from mcis_cli.errors import McisError
from mcis_cli.procs import stop_group

START_TIMEOUT = 180.0  # s; a cold start takes 5-40 s depending on the machine's load
STOP_TIMEOUT = 15.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def command(uri: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line; artifacts stay where the commands put them (./mlruns)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--default-artifact-root", "./mlruns",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]


def _url(host: str, port: int) -> str:
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # all interfaces: shown as local
    return f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise McisError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise McisError(f"mlflow server exited with code {proc.returncode} before answering; see its output above")
        if tracking.server_answers(url, timeout=2):
            return
        time.sleep(0.3)
    raise McisError(f"mlflow server did not answer at {url} within {START_TIMEOUT:.0f} s")


def training_links(url: str, limit: int = 10) -> list[tuple[str, str]]:
    """(name, link) of the most recently updated experiments, each opening on its runs table.

    MLflow 3's UI opens an experiment in its GenAI traces view unless told otherwise; the
    experiment tag `mlflow.experimentKind` is not enough, the `workflowType` URL parameter is.
    """
    query = json.dumps({"max_results": limit, "order_by": ["last_update_time DESC"]}).encode()
    request = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            found = json.load(reply).get("experiments", [])
    except (urllib.error.URLError, OSError, ValueError):
        return []
    return [(e["name"], f"{url}/#/experiments/{e['experiment_id']}?workflowType=machine_learning")
            for e in found if e["name"] != "Default"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(host: str, port: int, expose: bool, workers: int, console: Console) -> None:
    """Run the MLflow UI until Ctrl-C; bad options raise McisError before anything starts."""
    if workers < 1:
        raise McisError(f"--workers must be at least 1, got {workers}")
    if not is_loopback(host):
        if not expose:
            raise McisError(
                f"--host {host} would publish the MLflow UI, which has no login, beyond this machine; "
                "pass --expose to do it anyway, or keep the default 127.0.0.1"
            )
        console.print(
            f"[bold yellow]warning:[/] serving on {host}: anyone who can reach this address can read "
            "and change every run; for a team, use the authenticated server of docker-compose.yml",
            soft_wrap=True,
        )
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        console.print(f"MLFLOW_TRACKING_URI is the tracking server {uri}: its UI is there, open it in a browser.",
                      soft_wrap=True)
        return
    _check_port(host, port)
    url = _url(host, port)
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # GenAI job runners: unused
    proc = subprocess.Popen(command(uri, host, port, workers), env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        console.print(f"MLflow UI for {uri} starting at {url} (Ctrl-C stops it)", soft_wrap=True)
        _wait_ready(url, proc)
        console.print(f"[bold green]MLflow UI ready:[/] {url}", soft_wrap=True)
        for name, link in training_links(url):
            console.print(f"  runs of {name}: {link}", soft_wrap=True, highlight=False)
        code = proc.wait()
        raise McisError(f"mlflow server stopped on its own with code {code}; see its output above")
    except KeyboardInterrupt:
        console.print("stopping the MLflow UI")
    finally:
        stop_group(proc, STOP_TIMEOUT)  # the server and every worker it forked
        signal.signal(signal.SIGTERM, previous)
