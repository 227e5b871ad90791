"""Real multi-process runs for the tests: `mcis <command>` under torchrun (gloo on the CPU), or as
N plain processes given torchrun's environment by hand, with no agent to stop the others when one
dies (how a rank that is gone is noticed by those left)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

TIMEOUT = 400  # seconds a launch may take on two shared cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc mcis ARGS...`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "mcis_cli.cli", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def by_hand(code: str, args: list[str], nproc: int = 2, **env: str) -> list[subprocess.CompletedProcess]:
    """`python -c CODE ARGS...` once per rank, with the variables torchrun would set."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, **env))
        for r in range(nproc)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done
