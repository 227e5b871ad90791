"""Localize: the cached path against the official per-pair computation at the toy size, and the
feature cache's throughput at full size, a batch of one against the fixed batch.

Toy size: cached = the stage's path: each image's features (backbone + extra convs) computed
once and kept in the LRU cache, pair heads run on batches of pairs. naive = the official test.py:
every pair runs the whole network on both of its images, one pair at a time. Both get the same
partners (toy config: 3 per class + the flip / 0.75x / 2x self-pairs) and must give the same maps.
Target: >= 3x faster, max abs difference <= 1e-5.

Full size: VGG16 at width 1 and the VOC config's classifier input (256 px), random weights and
images, features as the cache computes them (`fixed_batches`): in batches of one against batches
of voc12_vgg16.yaml's `localize.feature_batch`; and whether an image's features in such a batch
are its own bits (`rows_independent`). With a GPU, the same on it in another column.

The settings alternate within each round, so a burst of load elsewhere hits all of them; every
figure is the median over the rounds of the round's figure (one run alone swings by 2x).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mcis_cli.config import load_config
from mcis_cli.data import synth, voc
from mcis_cli.models.mcis import MCISNet, build_classifier
from mcis_cli.stages import localize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGES = 48
ROUNDS = 5
TARGET = 3.0
TOLERANCE = 1e-5


def _timed(call: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    start = time.perf_counter()
    out = call()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def toy_rounds(rounds: int = ROUNDS) -> dict[str, float]:
    """Cached against naive maps at the toy size: the median per-round speed-up and the maps'
    largest difference."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIGS / "toy.yaml", [f"data.root={Path(tmp) / 'data'}"])
        synth.write(cfg.data.root, seed=0, n_train=IMAGES, n_val=2, size=cfg.data.synth.size)
        samples = voc.train_samples(cfg.data)
        torch.manual_seed(0)
        model = build_classifier(cfg.classify, len(voc.class_names(cfg.data.root))).eval()
        lc = cfg.localize
        size = lc.input_size or cfg.classify.input_size  # as the stage
        items = localize.plan(samples, lc.partners, cfg.seed)

        def maps(naive: bool) -> dict[str, np.ndarray]:
            cache = localize.FeatureCache(model, samples, size, torch.device("cpu"), lc.cache_mb, lc.feature_batch)
            return {item.sample.id: m for item, m in localize.compute_maps(
                model, items, samples, size, self_pairs=lc.self_pairs, gate=lc.gate,
                batch_size=lc.batch_size, cache=cache, naive=naive)}

        maps(False), maps(True)  # warm-up: kernel selection, lazy imports, file cache
        cached_s, naive_s, speedups, diff = [], [], [], 0.0
        for _ in range(rounds):
            (c, cached), (n, naive) = _timed(lambda: maps(False)), _timed(lambda: maps(True))
            cached_s.append(c)
            naive_s.append(n)
            speedups.append(n / c)
            diff = max([diff, *(float(np.abs(cached[k] - naive[k]).max()) for k in cached)])
    pairs = sum(len(js) for item in items for js in item.partners)
    return {"images": len(samples), "size": size, "width": cfg.classify.width, "pairs": pairs,
            "feature_batch": lc.feature_batch, "cached_s": statistics.median(cached_s),
            "naive_s": statistics.median(naive_s), "speedup": statistics.median(speedups),
            "speedups": speedups, "max_abs_diff": diff}


@torch.inference_mode()
def feature_rounds(device: torch.device, rounds: int = ROUNDS) -> dict[str, float]:
    """Features per second at full size on `device`: a batch of one and the VOC config's fixed
    batch, the same images, alternating; and whether batched rows are their own bits there."""
    cfg = load_config(CONFIGS / "voc12_vgg16.yaml")
    size, batch = cfg.localize.input_size or cfg.classify.input_size, cfg.localize.feature_batch
    torch.manual_seed(0)
    model = MCISNet(20, cfg.classify.width).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    independent = localize.rows_independent(model.features, x)  # also the warm-up of the batch shape
    _timed(lambda: localize.fixed_batches(model.features, x, 1), device)
    one, fixed, ratios = [], [], []
    for _ in range(rounds):
        a = _timed(lambda: localize.fixed_batches(model.features, x, 1), device)[0]
        b = _timed(lambda: localize.fixed_batches(model.features, x, batch), device)[0]
        one.append(batch / a)
        fixed.append(batch / b)
        ratios.append(a / b)
    return {"size": size, "width": cfg.classify.width, "batch": batch, "independent": independent,
            "one_per_s": statistics.median(one), "fixed_per_s": statistics.median(fixed),
            "ratio": statistics.median(ratios), "ratios": ratios}


def main() -> dict[str, object]:
    toy = toy_rounds()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    full = {d.type: feature_rounds(d) for d in devices}

    table = Table(title=f"localize at the toy size: {toy['images']} images at {toy['size']} px, width "
                        f"{toy['width']}, {toy['pairs']} cross pairs + {3 * toy['images']} self-pairs, "
                        f"{torch.get_num_threads()} threads; medians of {ROUNDS} interleaved rounds")
    for column in ("", "s", "ms / image", "vs naive"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("naive: whole network per pair (official)", f"{toy['naive_s']:.2f}",
                  f"{1000 * toy['naive_s'] / toy['images']:.1f}", "1.00")
    table.add_row(f"cached: features once (batches of {toy['feature_batch']}), batched pair heads",
                  f"{toy['cached_s']:.2f}", f"{1000 * toy['cached_s'] / toy['images']:.1f}",
                  f"{toy['speedup']:.2f}")
    fast = "[green]ok[/]" if toy["speedup"] >= TARGET else "[red]under target[/]"
    same = "[green]ok[/]" if toy["max_abs_diff"] <= TOLERANCE else "[red]maps differ[/]"
    table.add_row("speed-up (median of the rounds')", "", "", f"{toy['speedup']:.2f}x (target >= {TARGET:.0f}x) {fast}")
    table.add_row("  per round", "", "", " ".join(f"{s:.2f}" for s in toy["speedups"]))
    table.add_row("max |cached - naive|", "", "", f"{toy['max_abs_diff']:.1e} (<= {TOLERANCE:.0e}) {same}")
    Console().print(table)

    cpu = full["cpu"]
    table = Table(title=f"feature cache at full size: VGG16 width {cpu['width']:g}, {cpu['size']} px; "
                        f"medians of {ROUNDS} interleaved rounds")
    table.add_column("", justify="left")
    for name in full:
        table.add_column(name, justify="right")
    table.add_row("features / s, batch of 1", *(f"{r['one_per_s']:.2f}" for r in full.values()))
    table.add_row(f"features / s, fixed batch of {cpu['batch']} (localize.feature_batch)",
                  *(f"{r['fixed_per_s']:.2f}" for r in full.values()))
    table.add_row("fixed batch vs batch of 1 (median of the rounds')", *(f"{r['ratio']:.2f}x" for r in full.values()))
    table.add_row("  per round", *(" ".join(f"{s:.2f}" for s in r["ratios"]) for r in full.values()))
    table.add_row("an image's features in the batch are its own bits",
                  *("yes" if r["independent"] else "[red]no: the cache computes one at a time[/]" for r in full.values()))
    Console().print(table)
    return {"toy": toy, **full}


if __name__ == "__main__":
    main()
