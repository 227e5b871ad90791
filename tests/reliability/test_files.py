"""File-level guarantees: untrusted checkpoints, atomic writes, one writer per folder, clear I/O errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mcis_cli.checkpoints import load_checkpoint, save_checkpoint
from mcis_cli.cli import app
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, exclusive


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": _RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(McisError, match="refusing to load .*model.pt"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same file saved through torch.save is refused as well
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    with pytest.raises(McisError, match="not a plain weights file"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_checkpoint_round_trip_is_plain_tensors(tmp_path):
    state = {"state_dict": {"w": torch.arange(4.0)}, "epoch": 3, "names": ["a", "b"]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "maps.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.npz"]


def test_sigkill_mid_write_never_shows_a_torn_file(tmp_path):
    """A process killed -9 while writing leaves only complete files under final names."""
    script = (
        "import sys, time\n"
        "from mcis_cli.files import atomic_path\n"
        "for i in range(1000):\n"
        "    with atomic_path(sys.argv[1] + f'/f{i}.bin') as tmp:\n"
        "        tmp.write_bytes(b'x' * 1_000_000)\n"
        "        time.sleep(0.002)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    deadline = time.monotonic() + 60
    try:
        while len(list(tmp_path.glob("f*.bin"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    finals = list(tmp_path.glob("f*.bin"))
    assert finals, "the writer never got going"
    assert all(p.stat().st_size == 1_000_000 for p in finals)


def test_second_writer_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom mcis_cli.files import exclusive\n"
         "with exclusive(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(McisError, match=r"in use by another mcis command \(pid \d+\)"), \
                exclusive(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path):  # free again once the holder is gone
        pass


def test_unwritable_output_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(blocker / "toy"),
                                      "--n-train", "4", "--n-val", "2"])
    assert result.exit_code != 0
    assert str(blocker) in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
