"""What the segment training loop costs beyond the model: DataLoader, augmentation, logging.

full = the stage's own loop (`segment.run` on ground truth): decoding (once per image),
augmentation, collation, the step with its finite check, MLflow logging every step (sqlite) and
the rich progress bar; one iteration is the time from one step's start to the next one's.
bare = forward + backward + SGD update of one fixed batch already in memory.
One bare step runs just before each step of the loop (timed apart and subtracted), so both see
the same load from other processes: timing the two minutes apart let the load's drift decide
the ratio. The first iteration (warm-up) is not counted, nor are startup, validation and
checkpoints (none fall inside the timed steps). Toy config. Target: full / bare - 1 <= 10 % of
wall time; process CPU time is shown too.
"""

from __future__ import annotations

import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import scratch_store
from mcis_cli.config import Config, load_config
from mcis_cli.data import synth
from mcis_cli.stages import segment

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
STEPS = 30
TARGET = 0.10


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(cfg: Config) -> dict[str, float]:
    """Wall and CPU seconds of a loop iteration and of a bare step, averaged over the timed steps."""
    real = segment.train_step
    starts, bare, fixed = [], [], []

    def bare_step(trainer, net, rest) -> None:
        start = _clock()
        real(trainer, net, *fixed, "the bare step", *rest)
        bare.append([b - a for a, b in zip(start, _clock(), strict=True)])

    def with_bare_step(trainer, net, images, masks, where, *rest):
        starts.append(_clock())
        if not fixed:  # the bare steps' batch: the loop's first one, as the loop has it on the device
            fixed.extend((images, masks))
        first = len(starts) % 2  # the second of two steps runs warm: bare goes first every other time
        if first:
            bare_step(trainer, net, rest)
        loss = real(trainer, net, images, masks, where, *rest)
        if not first:
            bare_step(trainer, net, rest)
        return loss

    with mock.patch.object(segment, "train_step", with_bare_step):
        segment.run(cfg, labels="gt")
    # iteration k runs from start k to start k + 1 and holds bare step k; iteration 0 warms up
    full = [[b - a for a, b in zip(starts[k], starts[k + 1], strict=True)] for k in range(1, len(starts) - 1)]
    n = len(full)
    wall, cpu = (sum(f[i] - b[i] for f, b in zip(full, bare[1:], strict=False)) / n for i in range(2))
    bare_wall, bare_cpu = (sum(b[i] for b in bare[1 : n + 1]) / n for i in range(2))
    return {"wall": wall, "cpu": cpu, "bare_wall": bare_wall, "bare_cpu": bare_cpu}


def main() -> None:
    console = Console(width=120)
    rows = []
    with scratch_store() as tmp:
        root = tmp / "toy"
        synth.write(root, seed=0, n_train=120, n_val=2, size=96)
        base = [f"data.root={root}", f"output_dir={tmp}/runs", "device=cpu", "name=bench_segment",
                f"segment.iters={STEPS + 2}", "segment.val_every=0",
                f"segment.checkpoint_every={STEPS + 2}"]
        for workers in (0, 2):
            cfg = load_config(TOY, [*base, f"data.workers={workers}"])
            rows.append((f"data.workers={workers}", measure(cfg)))

    seg = cfg.segment
    table = Table(title=f"segment step time (batch {seg.batch_size}, crop {seg.crop}, width {seg.width}, "
                        f"{torch.get_num_threads()} threads, {STEPS} steps)")
    for column in ("measured", "wall s / step", "overhead", f"<= {TARGET:.0%}", "CPU s / step", "CPU overhead"):
        table.add_column(column, justify="left" if column == "measured" else "right")
    for name, m in rows:
        overhead = m["wall"] / m["bare_wall"] - 1
        table.add_row(f"bare forward+backward+SGD ({name})", f"{m['bare_wall']:.3f}", "", "", f"{m['bare_cpu']:.3f}", "")
        table.add_row(f"training loop, {name}", f"{m['wall']:.3f}", f"{overhead:+.1%}",
                      "yes" if overhead <= TARGET else "NO", f"{m['cpu']:.3f}", f"{m['cpu'] / m['bare_cpu'] - 1:+.1%}")
    console.print(table)


if __name__ == "__main__":
    main()
