"""A full-size run that does not fit in memory stops in one line naming the stage, the size it
ran at and the setting to lower (the engine's `Stage`, which wraps every stage's run); any other
RuntimeError keeps its traceback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from mcis_cli import engine
from mcis_cli.cli import app
from mcis_cli.errors import McisError
from mcis_cli.models.mcis import MCISNet

TOY = Path(__file__).resolve().parents[2] / "configs" / "toy.yaml"
CPU_OOM = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. "
           "Error code 12 (Cannot allocate memory)")


def test_classify_out_of_memory_is_one_line_with_the_size_and_the_setting(toy_root, store, monkeypatch):
    def features(self, x):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(MCISNet, "features", features)  # what torch raises when a forward cannot allocate
    values = {"name": "oom", "device": "cpu", "output_dir": str(store / "runs"), "data.root": str(toy_root),
              "data.workers": 0, "classify.width": 0.125, "classify.pretrained": False,
              "classify.input_size": 32, "classify.batch_size": 16, "classify.epochs": 1}
    args = ["classify", "--config", str(TOY)]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the progress bar
    assert errors == ["error: classify: out of host memory at 16 pairs of 32 px and its self-pair views, "
                      "width 0.125 (device cpu); lower classify.batch_size"], result.output


@pytest.mark.parametrize(("error", "where"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    (MemoryError("Unable to allocate 3.1 GiB for an array"), "host"),
])
def test_every_kind_of_failed_allocation_names_its_memory(error, where):
    @engine.Stage("segment", memory=lambda cfg: ("batch 10 of 321 px crops", "segment.batch_size"))
    def run(cfg):
        raise error

    with pytest.raises(McisError, match=rf"^segment: out of {where} memory at batch 10 of 321 px crops "
                                        r"\(device cuda\); lower segment.batch_size$"):
        run(SimpleNamespace(device="cuda"))


def test_other_runtime_errors_are_not_taken_for_memory():
    @engine.Stage("export", memory=lambda cfg: ("", ""))
    def run(cfg):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(SimpleNamespace(device="cpu"))
