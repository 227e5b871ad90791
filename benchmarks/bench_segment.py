"""What the segment training loop costs beyond the model: DataLoader, augmentation, logging.

Times a step of the full loop (`segment.run`, MLflow logging every step) against the bare
forward + backward + SGD step of the same model on one fixed batch of the same size and crop,
with configs/toy.yaml's segment settings on the embedded dataset. Target: overhead <= 10 %.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import scratch_store
from mcis_cli.config import Config, load_config
from mcis_cli.data import synth, voc
from mcis_cli.stages import segment

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
STEPS = 30
TARGET = 0.10


def bare_step_seconds(cfg: Config, steps: int = STEPS) -> float:
    """Mean seconds of train_step on one batch already in memory (after one warm-up step)."""
    seg = cfg.segment
    names = voc.class_names(cfg.data.root)
    items = [(s.image, voc.mask_path(cfg.data.root, s.id)) for s in voc.train_samples(cfg.data)]
    data = segment.CropDataset(items, len(names) + 1, seg, cfg.seed)
    batch = [data[(i, 0)] for i in range(seg.batch_size)]
    images, masks = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    trainer, net = segment.build_trainer(seg, len(names) + 1, torch.device("cpu"), imagenet=False)
    segment.train_step(trainer, net, images, masks, "the warm-up step")
    start = time.perf_counter()
    for step in range(steps):
        segment.train_step(trainer, net, images, masks, f"step {step}")  # syncs on the loss, as the loop
    return (time.perf_counter() - start) / steps


def loop_step_seconds(cfg: Config) -> float:
    """Mean seconds per step of the real training loop, from the throughput it reports."""
    result = segment.run(cfg, labels="gt")
    return cfg.segment.batch_size / result.metrics["throughput"]


def main() -> None:
    console = Console()
    with scratch_store() as tmp:
        root = tmp / "toy"
        synth.write(root, seed=0, n_train=120, n_val=2, size=96)
        base = [f"data.root={root}", f"output_dir={tmp}/runs", "device=cpu", "name=bench_segment",
                f"segment.iters={STEPS + 1}", "segment.val_every=0",
                f"segment.checkpoint_every={STEPS + 1}"]
        cfg = load_config(TOY, base)
        bare = [bare_step_seconds(cfg)]
        rows = []
        for workers in (0, 2):
            looped = loop_step_seconds(load_config(TOY, [*base, f"data.workers={workers}"]))
            rows.append((f"training loop, data.workers={workers}", looped))
        bare.append(bare_step_seconds(cfg))  # before and after: the machine's load drifts

    seg = cfg.segment
    reference = sum(bare) / len(bare)
    table = Table(title=f"segment step time (batch {seg.batch_size}, crop {seg.crop}, width {seg.width}, "
                        f"{torch.get_num_threads()} threads, {STEPS} steps)")
    for column in ("measured", "s / step", "overhead", f"<= {TARGET:.0%}"):
        table.add_column(column, justify="left" if column == "measured" else "right")
    table.add_row("bare forward+backward+SGD", f"{reference:.3f}", "", "")
    for name, seconds in rows:
        overhead = seconds / reference - 1
        table.add_row(name, f"{seconds:.3f}", f"{overhead:+.1%}", "yes" if overhead <= TARGET else "NO")
    console.print(table)


if __name__ == "__main__":
    main()
