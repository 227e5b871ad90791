"""A loss that turns non-finite stops training in one line naming the step and the last good
checkpoint; no weights written after it hold NaN or inf.

Both divergences are real ones of the command line, not patched losses: classify's learning rate
is multiplied by 1e8 at its second epoch (after a checkpoint), segment trains at lr 1e6.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mcis_cli.checkpoints import load_checkpoint
from tests.reliability import procs


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return procs.new_store(tmp_path_factory.mktemp("nonfinite-store"))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _all_finite(folder: Path) -> int:
    """Every checkpoint under `folder` loads and holds finite floats only; returns how many."""
    files = procs.finals(folder, "**/*.pt")
    for path in files:
        for tensor in _tensors(load_checkpoint(path)):
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path} holds non-finite values"
    return len(files)


@pytest.mark.parametrize(("stage", "values", "pattern"), [
    ("classify", {"classify.width": 0.125, "classify.pretrained": False, "classify.input_size": 32,
                  "classify.batch_size": 16, "classify.epochs": 3, "classify.lr": 0.01,
                  "classify.decay_epochs": [1], "classify.decay_factor": 1e8,
                  "classify.checkpoint_epoch": 0},
     r"non-finite loss .* at step (\d+) \(epoch 1\); last good checkpoint: (\S+last\.pt);"),
    ("segment", {"segment.width": 0.125, "segment.pretrained": False, "segment.batch_size": 2,
                 "segment.crop": 33, "segment.iters": 30, "segment.lr": 1e6, "segment.val_every": 0,
                 "segment.checkpoint_every": 1},
     r"loss is (?:nan|inf) at iteration (\d+); last good checkpoint: (\S+last\.pt)"),
], ids=["classify", "segment"])
def test_divergence_stops_with_step_and_last_good_checkpoint(stage, values, pattern, toy_root, tmp_path, uri):
    config = procs.write_config(tmp_path / "c.yaml", name=f"nonfinite-{stage}", device="cpu",
                                output_dir="runs", **{"data.root": str(toy_root), "data.workers": 0,
                                                      "tracking.flush_every": 1, **values})
    extra = ["--labels", "gt"] if stage == "segment" else []
    done = procs.run([stage, "--config", config, *extra], tmp_path, procs.env(uri))
    line = procs.one_line_error(done, "last good checkpoint")
    found = re.search(pattern, " ".join(line.split()))
    assert found, line
    checkpoint = tmp_path / found.group(2)
    assert checkpoint.is_file()
    mlc = MlflowClient(uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name(f"nonfinite-{stage}").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    folder = tmp_path / "runs" / runs[0].info.run_id
    assert _all_finite(folder) >= 1
    assert stage == "classify" or not (folder / "checkpoints" / "model.pt").exists()
