"""Benchmarks track to a store of their own: nothing lands in the user's ./mlflow.db or ./mlruns."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import scratch_store
from mcis_cli import tracking
from mcis_cli.config import Config


def test_scratch_store_keeps_runs_and_artifacts_out_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///user-store-must-stay-untouched.db")
    with scratch_store() as store:
        cfg = Config(name="bench-store", output_dir=str(store / "runs"), data={"root": str(store / "voc")})
        with tracking.stage_run(cfg, "segment") as tracker:
            tracker.log_text("a benchmark's artifact", "note.txt")
        artifact_uri = tracking.client(cfg).get_run(tracker.run_id).info.artifact_uri
        assert Path(artifact_uri.removeprefix("file://")).is_relative_to(store), artifact_uri
        assert (Path(artifact_uri.removeprefix("file://")) / "note.txt").is_file()
    assert not store.exists()  # removed with everything in it
    assert list(tmp_path.iterdir()) == []  # no mlruns/, no mlflow.db, no runs/ here
    assert Path.cwd() == tmp_path
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///user-store-must-stay-untouched.db"
