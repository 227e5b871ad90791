"""Classify: a training step of the whole pipeline against the bare step on the same batch.

full = the stage's own epoch loop (`Trainer.train_epoch`): JPEG decoding, resize, colour jitter,
partner and self-pair views, collation, normalisation, the step, the loss average and finiteness
check, per-step MLflow logging (sqlite) and the rich progress bar.
bare = forward + backward + SGD update of one batch already in memory and normalised.
One bare step runs before each full step (timed apart and subtracted), so both see the same
load from other processes. Toy config, contrastive epoch (every loss term on).
Target: full / bare - 1 <= 10 % of wall time; process CPU time is shown too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, default_collate

from benchmarks import scratch_store
from mcis_cli.config import load_config
from mcis_cli.data import synth, voc
from mcis_cli.models.mcis import mcis_loss
from mcis_cli.stages import classify
from mcis_cli.tracking import stage_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
STEPS = 24  # per epoch; the first epoch is a warm-up
EPOCHS = 4
TARGET = 0.10


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> dict[str, float]:
    with scratch_store() as tmp:
        cfg = load_config(CONFIG, [f"data.root={tmp / 'data'}", f"output_dir={tmp / 'runs'}",
                                   "device=cpu", "name=bench-classify"])
        c = cfg.classify
        synth.write(cfg.data.root, seed=0, n_train=STEPS * c.batch_size, n_val=2, size=cfg.data.synth.size)
        k = len(voc.class_names(cfg.data.root))
        data = classify.ClassifyDataset(voc.train_samples(cfg.data), k, c, cfg.seed, train=True)
        trainer = classify.Trainer(cfg, k, torch.device("cpu"), imagenet=False)
        epoch = c.contrastive_from_epoch
        data.set_epoch(epoch)
        batch = classify.prepare(default_collate([data[i] for i in range(c.batch_size)]), trainer.device)
        bare = [0.0, 0.0]  # wall, CPU seconds of the bare steps of the timed epochs

        def with_bare_steps(loader, timed: bool):
            for item in loader:
                start = _clock()
                total, _ = mcis_loss(trainer.model, batch, epoch, c)
                trainer.optimizer.zero_grad(set_to_none=True)
                total.backward()
                trainer.optimizer.step()
                if timed:
                    bare[:] = [b + now - s for b, now, s in zip(bare, _clock(), start, strict=True)]
                yield item

        both = [0.0, 0.0]
        with stage_run(cfg, "classify") as tracker, trainer.progress(EPOCHS * STEPS, 0, c.lr):
            for e in range(EPOCHS):
                data.set_epoch(epoch + e)
                batches = classify.epoch_batches(data.sampler, epoch + e, c.batch_size, 0, 1)
                loader = DataLoader(data, batch_sampler=batches, num_workers=cfg.data.workers)
                start = _clock()
                trainer.train_epoch(with_bare_steps(loader, e > 0), epoch, e * STEPS, tracker)
                if e > 0:
                    both = [b + now - s for b, now, s in zip(both, _clock(), start, strict=True)]
    steps = (EPOCHS - 1) * STEPS
    (bare_s, bare_cpu), (full_s, full_cpu) = ([v / steps for v in bare],
                                              [(t - b) / steps for t, b in zip(both, bare, strict=True)])
    overhead = full_s / bare_s - 1
    table = Table(title=f"classify step: toy config, {c.batch_size} pairs at {c.input_size} px, "
                        f"width {c.width}, {torch.get_num_threads()} threads, {cfg.data.workers} workers")
    for column in ("", "wall s / step", "vs bare", "CPU s / step", "vs bare"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("bare: forward + backward + SGD, batch in memory", f"{bare_s:.3f}", "1.00",
                  f"{bare_cpu:.3f}", "1.00")
    table.add_row("full: load, jitter, views, step, log, progress", f"{full_s:.3f}",
                  f"{full_s / bare_s:.2f}", f"{full_cpu:.3f}", f"{full_cpu / bare_cpu:.2f}")
    verdict = "[green]ok[/]" if overhead <= TARGET else "[red]over target[/]"
    table.add_row(f"overhead (target <= {TARGET:.0%})", f"{full_s - bare_s:+.3f}",
                  f"{overhead:+.1%} {verdict}", f"{full_cpu - bare_cpu:+.3f}", f"{full_cpu / bare_cpu - 1:+.1%}")
    Console().print(table)
    return {"bare_s": bare_s, "full_s": full_s, "overhead": overhead,
            "cpu_overhead": full_cpu / bare_cpu - 1}
