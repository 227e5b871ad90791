"""Processes: which one this is, whether another one still runs (from /proc), and stopping a
process group.

A run records the process that holds it open; a later command uses these to tell a run whose
process was killed (kill -9, power loss) from one still training, even when a pid was reused.
`mcis ui` and the tests' servers stop their children, and every worker those forked, the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path


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


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group that `proc` leads (started with start_new_session=True), wait up
    to `timeout` s, then SIGKILL whatever is left of the group: workers that outlived their parent."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
