"""Localize: cached, batched maps against the official per-pair computation on the same images.

cached = the stage's path: each image's features (backbone + extra convs) computed once and kept
in the LRU cache, pair heads run on batches of pairs. naive = the official test.py: every pair
runs the whole network on both of its images, one pair at a time. Both get the same partners
(toy config: 3 per class + the flip / 0.75x / 2x self-pairs) and must give the same maps.
Target: >= 3x faster, max abs difference <= 1e-5. Median of 3 rounds after a warm-up.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mcis_cli.config import load_config
from mcis_cli.data import synth, voc
from mcis_cli.models.mcis import build_classifier
from mcis_cli.stages import localize

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
IMAGES = 48
ROUNDS = 3
TARGET = 3.0
TOLERANCE = 1e-5


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"data.root={Path(tmp) / 'data'}"])
        synth.write(cfg.data.root, seed=0, n_train=IMAGES, n_val=2, size=cfg.data.synth.size)
        samples = voc.train_samples(cfg.data)
        torch.manual_seed(0)
        model = build_classifier(cfg.classify, len(voc.class_names(cfg.data.root))).eval()
        lc, size = cfg.localize, cfg.classify.input_size
        items = localize.plan(samples, lc.partners, cfg.seed)

        def timed(naive: bool) -> tuple[float, dict[str, np.ndarray]]:
            cache = localize.FeatureCache(model, samples, size, torch.device("cpu"), lc.cache_mb)
            start = time.perf_counter()
            maps = {item.sample.id: m for item, m in localize.compute_maps(
                model, items, samples, size, self_pairs=lc.self_pairs, gate=lc.gate,
                batch_size=lc.batch_size, cache=cache, naive=naive)}
            return time.perf_counter() - start, maps

        timed(False), timed(True)  # warm-up: kernel selection, lazy imports, file cache
        rounds = [(timed(False), timed(True)) for _ in range(ROUNDS)]
    cached_s = statistics.median(c[0] for c, _ in rounds)
    naive_s = statistics.median(n[0] for _, n in rounds)
    (_, cached), (_, naive) = rounds[0]
    diff = max(float(np.abs(cached[k] - naive[k]).max()) for k in cached)
    pairs = sum(len(js) for item in items for js in item.partners)
    speedup = naive_s / cached_s

    table = Table(title=f"localize: {len(samples)} images at {size} px, width {cfg.classify.width}, "
                        f"{pairs} cross pairs + {3 * len(samples)} self-pairs, {torch.get_num_threads()} threads")
    for column in ("", "s", "ms / image", "vs naive"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("naive: whole network per pair (official)", f"{naive_s:.2f}",
                  f"{1000 * naive_s / len(samples):.1f}", "1.00")
    table.add_row("cached: features once, batched pair heads", f"{cached_s:.2f}",
                  f"{1000 * cached_s / len(samples):.1f}", f"{speedup:.2f}")
    fast = "[green]ok[/]" if speedup >= TARGET else "[red]under target[/]"
    same = "[green]ok[/]" if diff <= TOLERANCE else "[red]maps differ[/]"
    table.add_row("speed-up", "", "", f"{speedup:.2f}x (target >= {TARGET:.0f}x) {fast}")
    table.add_row("max |cached - naive|", "", "", f"{diff:.1e} (<= {TOLERANCE:.0e}) {same}")
    Console().print(table)
    return {"cached_s": cached_s, "naive_s": naive_s, "speedup": speedup, "max_abs_diff": diff}


if __name__ == "__main__":
    main()
