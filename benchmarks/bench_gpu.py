"""What each GPU training setting (the config's `speed` section, and the stages' `amp`) buys: the
segmenter's training step at the VOC recipe's size (DeepLab-LargeFOV VGG16 at width 1, batch 10
of 321 px crops), images per second and peak GPU memory with every setting off, then with each one
on alone, then with all on. The settings take turns within each round (interleaved) and the
median over the rounds is reported. Needs a CUDA device; elsewhere it says so and measures
nothing.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from mcis_cli import training
from mcis_cli.config import SegmentCfg, SpeedCfg
from mcis_cli.devices import configure_speed
from mcis_cli.models.deeplab import build_segmenter, param_groups
from mcis_cli.stages.segment import pixel_loss

BATCH, CROP, CLASSES = 10, 321, 21
ROUNDS, STEPS, WARMUP = 3, 10, 3
OFF = {"cudnn_benchmark": False, "tf32": False, "channels_last": False, "compile": False, "amp": False}
SETTINGS = {"all off": {}, **{f"{name} on": {name: True} for name in OFF}, "all on": dict.fromkeys(OFF, True)}


def _trainer(options: dict[str, bool], device: torch.device) -> tuple[training.Trainer, torch.nn.Module]:
    speed = SpeedCfg(amp_dtype="bf16", **{k: v for k, v in options.items() if k != "amp"})
    configure_speed(speed, deterministic=False)
    seg = SegmentCfg()
    model = build_segmenter(seg, CLASSES).to(device)
    optimizer = torch.optim.SGD(param_groups(model, seg.weight_decay, seg.lr_mult_bias, seg.lr_mult_classifier),
                                lr=seg.lr, momentum=seg.momentum)
    trainer = training.Trainer("segment", model, optimizer, device, options["amp"], 1, speed)
    return trainer, trainer.parallel(model)


def measure(options: dict[str, bool], device: torch.device) -> tuple[float, float]:
    """(images per second, peak GiB) of STEPS steps after WARMUP, on a fixed random batch."""
    options = OFF | options
    trainer, net = _trainer(options, device)
    images = torch.randn(BATCH, 3, CROP, CROP, device=device)
    masks = torch.randint(0, CLASSES, (BATCH, CROP, CROP), device=device)
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        with trainer.autocast():
            loss = pixel_loss(net(images), masks)
        trainer.step(loss, {}, f"step {step}")
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return BATCH * STEPS / seconds, torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    out = Console()
    if not torch.cuda.is_available():
        out.print("no CUDA device: the GPU settings cannot be measured here")
        return
    device = torch.device("cuda")
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    for _ in range(ROUNDS):
        for name, options in SETTINGS.items():
            found[name].append(measure(options, device))
    table = Table(title=f"segment training step, batch {BATCH} x {CROP} px, {torch.cuda.get_device_name(device)}, "
                        f"median of {ROUNDS} rounds")
    for column in ("settings", "images/s", "vs all off", "peak GiB"):
        table.add_column(column, justify="left" if column == "settings" else "right")
    base = statistics.median(r for r, _ in found["all off"])
    for name, runs in found.items():
        rate, peak = statistics.median(r for r, _ in runs), statistics.median(p for _, p in runs)
        table.add_row(name, f"{rate:.1f}", f"{rate / base:.2f}x", f"{peak:.2f}")
    out.print(table)
