"""A full disk or an unwritable output folder: one line naming the file, the run marked FAILED.

The failures are the kernel's own: a 2 MB tmpfs that fills up (ENOSPC) or is mounted read-only
(EROFS) when this process may mount (root), a file-size limit set on the child (EFBIG, any user),
and a regular file standing where the output folder should be (ENOTDIR, any user). The tracking
store lives elsewhere, so the run can be marked. Training is `mcis segment --labels gt`, whose
checkpoint (2.6 MB with the optimizer state) cannot fit.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.reliability import procs

LIMIT = 1_500_000  # bytes: above the store's 1 MB, below the checkpoint


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("storage-store")
    procs.new_store(folder)
    return folder / "mlflow.db"


def _mount(folder: Path, *options: str) -> str | None:
    """Mount a 2 MB tmpfs on `folder`; the reason it cannot, or None."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=2m", *options]), "tmpfs",
                               str(folder)], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"cannot run mount ({exc})"
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


@pytest.fixture
def volume(request, tmp_path) -> Iterator[tuple[Path, str]]:
    """(output_dir, expected errno text) for the parametrized kind of broken storage."""
    kind = request.param
    out = tmp_path / "out"
    if kind in ("full", "read-only"):
        why = _mount(out, *(["ro"] if kind == "read-only" else []))
        if why:
            pytest.skip(why)
        try:
            yield out, {"full": "No space left on device", "read-only": "Read-only file system"}[kind]
        finally:
            subprocess.run(["umount", "-l", str(out)], capture_output=True, timeout=30)
        return
    if kind == "not-a-folder":
        out.write_text("a file where the output folder should be")
        yield out / "runs", "Not a directory"
        return
    yield out, "File too large"  # size-limit


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("volume", ["full", "read-only", "not-a-folder", "size-limit"], indirect=True)
def test_broken_storage_is_one_line_naming_the_file_and_the_run_is_failed(volume, toy_root, tmp_path,
                                                                           template, request):
    out, reason = volume
    shutil.copy(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = request.node.callspec.id
    config = procs.write_config(
        tmp_path / "segment.yaml", name=name, device="cpu", output_dir=str(out), **{
            "data.root": str(toy_root), "data.workers": 0, "segment.width": 0.125,
            "segment.pretrained": False, "segment.batch_size": 2, "segment.crop": 33,
            "segment.iters": 4, "segment.val_every": 0, "segment.checkpoint_every": 2,
            "tracking.flush_every": 1,
        })
    args = procs.command("segment", "--config", config, "--labels", "gt")
    done = subprocess.run(args, cwd=tmp_path, env=procs.env(uri), capture_output=True, text=True,
                          timeout=procs.TIMEOUT, preexec_fn=_limit_file_size if name == "size-limit" else None)
    procs.one_line_error(done, reason, str(out), "point the output elsewhere")
    mlc = MlflowClient(uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name(name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    if out.is_dir():  # nothing half-written under a final name, no temporary file left
        assert not list(out.rglob("*.pt")) and not list(out.rglob(".*.part*"))


def test_synth_into_a_full_disk_leaves_nothing(tmp_path):
    """`data synth` builds in a temporary sibling: a failing write leaves no tree, one line."""
    done = subprocess.run(procs.command("data", "synth", "--out", tmp_path / "toy", "--n-train", "40",
                                        "--n-val", "4"),
                          cwd=tmp_path, env=procs.env("sqlite:///unused.db"), capture_output=True,
                          text=True, timeout=procs.TIMEOUT, preexec_fn=_limit_file_size_tiny)
    procs.one_line_error(done, "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _limit_file_size_tiny() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
