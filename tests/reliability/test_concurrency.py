"""Two commands writing the same output at once: the second refuses in one line, nothing breaks.

The first command is real and is frozen with SIGSTOP the moment it holds its lock (its lock file
appears), so the overlap is certain rather than a race; the second command then runs to its
refusal, the first is continued with SIGCONT and must finish with intact outputs.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mcis_cli import artifacts, checkpoints, engine
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.models.deeplab import DeepLabLargeFOV
from mcis_cli.serving import open_session, read_metadata
from tests.reliability import procs
from tests.reliability.test_inputs import tiny_model


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return procs.new_store(tmp_path_factory.mktemp("concurrency-store"))


def _freeze_when(path_ready, proc, log, what: str) -> None:
    procs.wait_until(path_ready, proc, log, what, poll=0.005, freeze=True)
    assert proc.poll() is None, f"the first command finished before it could be frozen ({what})"


def _thaw(proc) -> int:
    os.killpg(proc.pid, signal.SIGCONT)
    return proc.wait(procs.TIMEOUT)


def test_second_synth_into_the_same_folder_is_refused(tmp_path, uri):
    out = tmp_path / "toy"
    environ = procs.env(uri)
    log = tmp_path / "first.log"
    first = procs.start(["data", "synth", "--out", out, "--n-train", "200", "--n-val", "20"],
                        tmp_path, environ, log)
    _freeze_when(lambda: (tmp_path / ".toy.lock").is_file(), first, log, "synth's lock")
    try:
        second = procs.run(["data", "synth", "--out", out, "--n-train", "8", "--n-val", "2"], tmp_path,
                           environ)
        procs.one_line_error(second, str(out), "in use by another mcis command", f"pid {first.pid}")
    finally:
        assert _thaw(first) == 0, procs.tail(log)
    check = procs.run(["data", "check", "--root", out], tmp_path, environ)
    assert check.returncode == 0 and "no problems found" in check.stdout, check.output
    assert len(list((out / voc.IMAGES).glob("*.jpg"))) == 220  # the first one's tree, whole


def test_second_predict_into_the_same_folder_is_refused(tmp_path, uri):
    model = tmp_path / "model.onnx"
    onnx.save(tiny_model(), model)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    out = tmp_path / "masks"
    environ = procs.env(uri)
    log = tmp_path / "first.log"
    first = procs.start(["predict", images, "--model", model, "--out", out, "--provider", "cpu"],
                        tmp_path, environ, log)
    _freeze_when(lambda: (out / ".mcis.lock").is_file(), first, log, "predict's lock")
    try:
        second = procs.run(["predict", images, "--model", model, "--out", out, "--provider", "cpu"],
                           tmp_path, environ)
        procs.one_line_error(second, str(out), "in use by another mcis command", "--out folder")
    finally:
        assert _thaw(first) == 0, procs.tail(log)
    masks = procs.finals(out, "*.png")
    assert len(masks) == 300 and all(transforms.read_index_png(p).shape == (48, 64) for p in masks)
    assert not list(out.glob(".*"))  # no temporary file, no lock file left


def test_second_export_to_the_same_file_is_refused(tmp_path, uri, toy_root):
    cfg = Config(name="export-lock", device="cpu", output_dir=str(tmp_path / "runs"),
                 data={"root": str(toy_root)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        torch.manual_seed(0)
        model = DeepLabLargeFOV(3, width=0.125)
        with engine.stage_run(cfg, "segment") as tracker:
            path = engine.workdir(cfg, tracker.run_id) / artifacts.MODEL
            checkpoints.save_checkpoint(path, {
                "state_dict": model.state_dict(), "arch": "vgg16", "num_classes": 3, "width": 0.125,
                "class_names": ["background", "a", "b"], "mean": list(transforms.IMAGENET_MEAN),
                "std": list(transforms.IMAGENET_STD)})
            tracker.log_artifact(path, "checkpoints")
    source = tracker.run_id
    config = procs.write_config(tmp_path / "c.yaml", name=cfg.name, device="cpu", output_dir=cfg.output_dir,
                                **{"data.root": str(toy_root), "export.parity_sizes": [[1, 33, 33]],
                                   "export.register_model": False})
    out = tmp_path / "served" / "model.onnx"
    environ = procs.env(uri)
    log = tmp_path / "first.log"
    args = ["export", "--config", config, "--from-run", source, "--out", out]
    first = procs.start(args, tmp_path, environ, log)
    _freeze_when(lambda: (out.parent / ".model.onnx.lock").is_file(), first, log, "export's lock")
    try:
        second = procs.run(args, tmp_path, environ)
        procs.one_line_error(second, str(out), "in use by another mcis command", "--out file")
    finally:
        assert _thaw(first) == 0, procs.tail(log)
    open_session(out, "cpu")
    assert read_metadata(out)["source_run"] == source
    mlc = MlflowClient(uri)
    exports = mlc.search_runs([mlc.get_experiment_by_name(cfg.name).experiment_id],
                              "tags.`mcis.stage` = 'export'")
    assert [r.info.status for r in exports] == ["FINISHED"]  # the refused one opened no run


def test_resume_of_a_run_that_is_still_training_is_refused(tmp_path, uri, toy_root):
    config = procs.write_config(
        tmp_path / "classify.yaml", name="resume-live", device="cpu", output_dir="runs", **{
            "data.root": str(toy_root), "data.workers": 0, "classify.width": 0.125,
            "classify.pretrained": False, "classify.input_size": 32, "classify.batch_size": 16,
            "classify.epochs": 2, "classify.checkpoint_epoch": 0, "classify.log_every": 1,
            "tracking.flush_every": 1,
        })
    environ = procs.env(uri)
    log = tmp_path / "first.log"
    first = procs.start(["classify", "--config", config], tmp_path, environ, log)
    mlc = MlflowClient(uri)

    def training():
        found = mlc.get_experiment_by_name("resume-live")
        runs = mlc.search_runs([found.experiment_id]) if found else []
        return runs and mlc.get_metric_history(runs[0].info.run_id, "loss/total") and runs[0].info.run_id

    procs.wait_until(training, first, log, "the first step", freeze=True)
    run_id = training()
    try:
        second = procs.run(["classify", "--config", config, "--resume", run_id], tmp_path, environ)
        procs.one_line_error(second, f"run {run_id} is still open in process {first.pid}")
    finally:
        assert _thaw(first) == 0, procs.tail(log)
    assert mlc.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in mlc.get_metric_history(run_id, "loss/total")) == list(range(6))
    assert checkpoints.load_checkpoint(tmp_path / "runs" / run_id / "checkpoints" / "last.pt")["epoch"] == 1
