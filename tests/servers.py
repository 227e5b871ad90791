"""Real services for the tests: `mlflow server`, a throwaway PostgreSQL cluster, headless chromium.

Every server binds 127.0.0.1 on a free port, runs in a process group of its own and is stopped
with the whole group, so no uvicorn worker outlives its test module. Each helper says why it
cannot run (binaries missing, not root) so a test can skip with that reason, never silently.

A test module takes a fixture by assignment, with the fixtures it depends on:
    mlflow_server = servers.mlflow_server
    sqlite_template = servers.sqlite_template
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mcis_cli import procs
from mcis_cli.tracking import server_answers

START_TIMEOUT = 240.0  # s; a cold `mlflow server` takes 10-40 s on two busy cores
# The job runner (GenAI jobs, seven huey processes) is not used by mcis; leaving it out of the
# test servers saves ~0.5 GB and most of the start-up time.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)


def free_port() -> int:
    """A port nothing listens on right now (also what a test uses as a closed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    """Poll `url` until it answers 200; fail with the log tail if the process dies."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args[:4]))} exited with {proc.returncode}:\n{tail(log)}")
        if server_answers(url, timeout=3, path=""):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


def stop_group(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM the process group led by `proc`, wait, then SIGKILL whatever is left of the group."""
    if proc is not None:
        procs.stop_group(proc, timeout)


def json_request(url: str, payload: dict | None = None, headers: dict | None = None) -> dict:
    """GET (or POST `payload`) a JSON endpoint of the MLflow REST API."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


# ---- mlflow server ---------------------------------------------------------------------------
@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with artifacts proxied to `cwd`/mlartifacts.

    `command` replaces the default arguments (used to run docker-compose.yml's exact command);
    stop() and start() again reuse the port and the backend, like a server restart.
    """

    backend: str
    cwd: Path
    port: int = field(default_factory=free_port)
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.cwd / f"mlflow-server-{self.port}.log"

    def args(self) -> list[str]:
        return self.command or [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--serve-artifacts", "--artifacts-destination", str(self.cwd / "mlartifacts"),
        ]

    def start(self) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(), cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                env={**env, **SERVER_ENV, **self.env}, start_new_session=True,
            )
        try:
            wait_http(self.uri + "/health", self.proc, self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store: copying it is instant, creating one takes 5-20 s."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("sqlite-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, sqlite_template):
    """One sqlite-backed server per test module (start-up is the expensive part)."""
    cwd = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(sqlite_template, cwd / "mlflow.db")
    server = MlflowServer(f"sqlite:///{cwd / 'mlflow.db'}", cwd).start()
    yield server
    server.stop()


# ---- PostgreSQL ------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """Folder of initdb/pg_ctl: `pg_config --bindir`, else the Debian location of PostgreSQL 15."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(out.stdout.strip()))
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def postgres_missing() -> str | None:
    """Why a throwaway cluster cannot be started here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root and runuser is missing: initdb refuses to run as root"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no `postgres` user exists to own the cluster"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class Postgres:
    """A throwaway cluster (trust auth, user `mcis`) listening on 127.0.0.1:`port`.

    initdb refuses root, so as root the cluster is owned and run by the `postgres` user, in a
    folder under /tmp it can reach (pytest's tmp_path sits below a 0700 folder).
    """

    root: Path
    port: int = field(default_factory=free_port)
    user: str = "mcis"

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def _run(self, *cmd: str) -> None:
        out = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}\n{tail(self.root / 'log')}")

    def start(self) -> Postgres:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        bin_dir = postgres_bin()
        self._run(str(bin_dir / "initdb"), "-D", str(self.root / "db"), "-A", "trust",
                  "-U", self.user, "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(bin_dir / "pg_ctl"), "-D", str(self.root / "db"), "-o", options,
                  "-l", str(self.root / "log"), "-w", "start")
        return self

    def create_database(self, name: str) -> str:
        """Create `name` and return its SQLAlchemy URI."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.root / "db" / "postmaster.pid").exists():
            self._run(str(postgres_bin() / "pg_ctl"), "-D", str(self.root / "db"), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def postgres():
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="mcis-pg-"))
    cluster = Postgres(root)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---- chromium --------------------------------------------------------------------------------
def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium(url: str, profile: Path, *args: str, timeout: float = 180) -> tuple[str, str]:
    """(stdout, stderr) of headless chromium run once on `url`, e.g. with --dump-dom or
    --screenshot=PATH; its renderer and GPU processes are stopped with it."""
    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        return proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
