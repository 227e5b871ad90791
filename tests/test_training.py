"""The training skeleton's GPU settings on the CPU: each is accepted, changes what it should,
and leaves the CPU path (fp32, the loss of a step) as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcis_cli import training
from mcis_cli.config import SpeedCfg
from mcis_cli.devices import configure_speed


def _trainer(speed: SpeedCfg, amp: bool = False) -> training.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.SGD([{"params": model.parameters(), "lr_mult": 1.0}], lr=0.1)
    return training.Trainer("segment", model, optimizer, torch.device("cpu"), amp, 1, speed)


def _step(trainer: training.Trainer) -> float:
    net = trainer.parallel(trainer.model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with trainer.autocast():
        loss = net(x).square().mean()
    return trainer.step(loss, {}, "step 0")["total"]


def test_cudnn_search_is_off_when_deterministic_and_tf32_follows_its_setting():
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # PyTorch's default, whatever ran before
    configure_speed(SpeedCfg(cudnn_benchmark=True, tf32=True), deterministic=False)
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.fp32_precision == "tf32"
    configure_speed(SpeedCfg(cudnn_benchmark=True, tf32=False), deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # PyTorch's; "ieee" breaks the ONNX export


def test_channels_last_lays_out_the_weights_and_trains_as_before():
    plain, nhwc = _trainer(SpeedCfg()), _trainer(SpeedCfg(channels_last=True))
    weight = nhwc.model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert _step(nhwc) == pytest.approx(_step(plain), rel=1e-5)


def test_amp_needs_cuda_so_a_cpu_trains_in_fp32_whatever_the_dtype():
    for dtype in ("fp16", "bf16"):
        trainer = _trainer(SpeedCfg(amp_dtype=dtype), amp=True)
        assert not trainer.amp and not trainer.scaler.is_enabled()
        with trainer.autocast():
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.slow
def test_compile_wraps_what_a_step_calls_and_gives_the_same_loss():
    eager, compiled = _trainer(SpeedCfg()), _trainer(SpeedCfg(compile=True))
    assert type(compiled.parallel(compiled.model)).__name__ == "OptimizedModule"
    assert _step(compiled) == pytest.approx(_step(eager), rel=1e-5)
    assert isinstance(compiled.model, nn.Sequential)  # the saved weights are the plain module's
