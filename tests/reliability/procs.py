"""Helpers for the reliability tests: real `mcis` subprocesses, SIGKILL at a chosen moment.

Every command runs as `python -m mcis_cli.cli` in a process group of its own, so a kill takes
its DataLoader workers too, as `kill -9 -PGID` or a lost machine would. Configs are complete
YAML files written from the built-in defaults plus the test's values, never configs/toy.yaml.
Kill moments come from a seeded RNG: MCIS_KILL_SEED picks another set of moments, and
MCIS_KILL_LOG (a file) collects one JSON line per kill for the issue's figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mcis_cli.config import Config

SEED = int(os.environ.get("MCIS_KILL_SEED", "0"))
TIMEOUT = 240.0  # s for one command on two busy cores


def new_store(folder: Path) -> str:
    """A migrated sqlite store in `folder`; its URI. Created from inside `folder`, because MLflow
    keeps one store object per URI whose artifact root is ./mlruns of where it was created."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    here = os.getcwd()
    os.chdir(folder)
    try:
        MlflowClient(uri).search_experiments()
    finally:
        os.chdir(here)
    return uri


def write_config(path: Path, **values: Any) -> Path:
    """A complete config file: the defaults with `values` (dotted keys) set."""
    tree = Config().model_dump(mode="json")
    for dotted, value in values.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    Config.model_validate(tree)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def env(uri: str, **extra: str) -> dict[str, str]:
    """The child environment: the test's store, one thread (same arithmetic in every child)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return {**base, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore", "COLUMNS": "200", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcis_cli.cli", *map(str, args)]


def start(args: list[str], cwd: Path, environ: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(command(*args), cwd=cwd, env=environ, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run(args: list[str], cwd: Path, environ: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*args), cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    done.output = done.stdout + done.stderr  # type: ignore[attr-defined]
    return done


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def wait_until(condition: Callable[[], Any], proc: subprocess.Popen, log: Path, what: str,
               timeout: float = TIMEOUT, poll: float = 0.05, freeze: bool = False) -> Any:
    """Poll `condition` until it returns something truthy; fail if `proc` ends first.

    With `freeze`, `proc`'s group is stopped (SIGSTOP) while `condition` is read and stays stopped
    when it holds (the caller kills it or sends SIGCONT), so what the caller does next happens
    where the condition saw it: a tiny step takes less than one read of the store on two busy
    cores, and a lagging read once found the run finished.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if freeze:
            _signal_group(proc, signal.SIGSTOP)
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - e.g. the run not created yet, a file mid-rename
            value = None
        if value:
            return value
        if freeze:
            _signal_group(proc, signal.SIGCONT)
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (code {proc.returncode}) before {what}:\n{tail(log)}")
        time.sleep(poll)
    kill(proc)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group, as kill -9 would, and reap it."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def kill_point(name: str, low: int, high: int) -> int:
    """The step (low..high) at which the test called `name` kills, from the seeded RNG."""
    return random.Random(f"{SEED}:{name}").randint(low, high)


def record(stage: str, at: str, **outcome: Any) -> None:
    """One line in MCIS_KILL_LOG (when set): what was killed where, and what it cost."""
    path = os.environ.get("MCIS_KILL_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"stage": stage, "at": at, "seed": SEED, **outcome}) + "\n")


def finals(folder: Path, pattern: str) -> list[Path]:
    """Files under their final names (pathlib's glob also matches the hidden temporary ones)."""
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with one `error:` line holding every needle, and no traceback."""
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {text}"
    return errors[0]
