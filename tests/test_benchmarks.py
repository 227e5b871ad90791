"""Benchmarks track to a store of their own: nothing lands in the user's ./mlflow.db or ./mlruns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import bench_fullscale as bench
from benchmarks import scratch_store
from mcis_cli import engine, tracking
from mcis_cli.config import Config


def test_scratch_store_keeps_runs_and_artifacts_out_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///user-store-must-stay-untouched.db")
    with scratch_store() as store:
        cfg = Config(name="bench-store", output_dir=str(store / "runs"), data={"root": str(store / "voc")})
        with engine.stage_run(cfg, "segment") as tracker:
            tracker.log_text("a benchmark's artifact", "note.txt")
        artifact_uri = tracking.client(cfg).get_run(tracker.run_id).info.artifact_uri
        assert Path(artifact_uri.removeprefix("file://")).is_relative_to(store), artifact_uri
        assert (Path(artifact_uri.removeprefix("file://")) / "note.txt").is_file()
    assert not store.exists()  # removed with everything in it
    assert list(tmp_path.iterdir()) == []  # no mlruns/, no mlflow.db, no runs/ here
    assert Path.cwd() == tmp_path
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///user-store-must-stay-untouched.db"


def test_fullscale_projection_arithmetic():
    assert bench.project(2.5, 14_400) == pytest.approx(10.0)  # 2.5 s x 14,400 = 36,000 s = 10 h
    cfg = Config(name="b", data={"root": "voc"}, classify={"batch_size": 5, "epochs": 15},
                 segment={"iters": 15_000})
    units = bench.budget(cfg)
    assert units["classify"] == 15 * 2_117  # ceil(10,582 / 5) steps an epoch, the last of 2 pairs
    assert (units["localize"], units["pseudolabel"], units["segment"], units["evaluate"]) == (
        10_582, 10_582, 15_000, 1_449)
    assert units["accumulate"] == units["integral"] == 15 * 2_116  # 10,582 // (1 x 5): about 31.7k steps
    assert units["psa_classify"] == 15 * 661  # 10,582 // 16 full batches an epoch (drop_last)
    assert units["affinity"] == 8 * 1_322  # 10,582 // 8
    assert units["psa_cam"] == units[bench.LABELS_ROW] == units["refine"] == 10_582
    assert bench._values(["fullscale", "--set", "device=cuda", "--stages", "refine", "--set", "segment.amp=true"],
                         "--set") == ["device=cuda", "segment.amp=true"]


def test_fullscale_stages_bring_the_stages_they_read():
    assert bench.chain(["refine"]) == ("psa_classify", "psa_cam", "affinity", "refine")
    assert bench.chain(["integral", "localize"]) == ("classify", "localize", "accumulate", "integral")
    with pytest.raises(SystemExit, match="no stage 'walk'"):
        bench.chain(["walk"])


def test_fullscale_disk_scales_only_the_per_image_files():
    written = {"disk": 1_000 + 2 * bench.N_TRAIN * 50}  # a fixed 1,000 bytes + 2 copies of a file an image
    assert bench._disk(written, 100, 50.0, 2) == 1_000 + 2 * 100 * 50
    assert bench._disk({"disk": 7}, 15_000, None, 0) == 7  # a checkpoint: the same whatever the count


def test_fullscale_copies_count_a_stages_own_files_only(tmp_path):
    for folder, content in [("a/maps", b"1"), ("mlruns/a/maps", b"1"), ("b/maps", b"2"), ("voc/maps", b"1")]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "000001.npz").write_bytes(content)
    assert bench._copies(tmp_path, tmp_path / "voc", tmp_path / "a" / "maps") == 2  # not b's, not the tree's
