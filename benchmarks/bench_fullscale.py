"""The official recipe at full size on this machine, projected to the paper's whole budget.

Every stage of configs/voc12_vgg16.yaml runs once, unchanged but for the counts (COUNTS: epochs,
steps, images), on a small VOC-shaped synth tree, each stage in a fresh process so that its
peak RSS (ru_maxrss) is its own. The unit costs (seconds per step or per image, the first step
excluded), the peak memory and the bytes each stage wrote are then scaled to 10,582 training
images, the config's classifier epochs at its batch of pairs, its segmenter iterations and
1,449 val images. The localization feature cache is replayed at VOC scale (10,582 images, VOC's
label-count histogram) to show that it stays within localize.cache_mb, and how often it misses.

`python -m benchmarks fullscale`, or `python -m benchmarks.bench_fullscale --set device=cuda` on
a GPU box; `--stages refine,integral` runs those stages and the ones they read.
"""

from __future__ import annotations

import importlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks import scratch_store
from mcis_cli import devices, engine, training
from mcis_cli.config import Config, load_config
from mcis_cli.data import synth, voc
from mcis_cli.stages import affinity, evaluate, localize, psa_cam, pseudolabel, refine

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "voc12_vgg16.yaml"
N_TRAIN, N_VAL = 16, 2  # one batch of PSA's classifier; three classifier steps of 5 pairs
TRAIN_IMAGES, VAL_IMAGES = 10_582, 1_449  # train_aug, val [docs/method.md §1.4, §4.3]
VOC_LABEL_COUNTS = {1: 6746, 2: 2894, 3: 774, 4: 141, 5: 27}  # classes per image, train_cls.txt [docs/method.md §7]
RSS_LIMIT = 24 * 2**30
LABELS_ROW = "affinity labels"  # the per-image part of the affinity stage: two CRFs an image
PER_IMAGE = (("localize", "maps"), ("pseudolabel", "pseudo"), ("accumulate", "maps"), ("integral", "maps"),
             ("psa_cam", "maps"), (LABELS_ROW, affinity.LABELS), ("refine", "maps"))
MISS_SAMPLES = 8  # images timed, in the cache's batches, for the cost of a cache miss
COUNTS = [  # steps and images only; the random init costs what the ImageNet one does
    "data.workers=0", "classify.epochs=1", "classify.contrastive_from_epoch=0", "classify.log_every=1",
    "classify.pretrained=false", "segment.pretrained=false", "segment.iters=3", "segment.val_every=0",
    "segment.log_every=1", "evaluate.overlays=1", "tracking.flush_every=1",
    # OAA / OAA+: one epoch of 2 steps of 5 images, accumulating from the first (the official
    # epoch 0 stores nothing); their units are training steps, the maps pass after it is not projected
    "accumulate.epochs=1", "accumulate.start_epoch=0", "accumulate.pretrained=false", "accumulate.log_every=1",
    "integral.epochs=1", "integral.pretrained=false", "integral.log_every=1",
    # PSA: two epochs of one 16-image classifier step, one epoch of two 8-crop AffinityNet steps
    "psa.epochs=2", "psa.pretrained=false", "psa.log_every=1",
    "affinity.epochs=1", "affinity.pretrained=false", "affinity.log_every=1",
]
STAGES = ("classify", "localize", "pseudolabel", "segment", "evaluate", "export", "accumulate", "integral",
          "psa_classify", "psa_cam", "affinity", "refine")
ROWS = (*STAGES[:-1], LABELS_ROW, STAGES[-1])
INPUTS = {"localize": {"from_run": "classify"}, "pseudolabel": {"from_run": "localize"},
          "segment": {"from_run": "pseudolabel"}, "evaluate": {"from_run": "segment"},
          "export": {"from_run": "segment"}, "integral": {"from_run": "accumulate"},
          "psa_cam": {"from_run": "psa_classify"}, "affinity": {"from_run": "psa_cam"},
          "refine": {"from_run": "psa_cam", "affinity_run": "affinity"}}
UNIT = {"classify": "step", "localize": "image", "pseudolabel": "image", "segment": "step",
        "evaluate": "image", "export": "run", "accumulate": "step", "integral": "step",
        "psa_classify": "step", "psa_cam": "image (4 scales + flip)", "affinity": "step",
        LABELS_ROW: "image (2 CRFs)", "refine": "image (walk)"}


def project(unit_seconds: float, units: int) -> float:
    """Hours for `units` of work at `unit_seconds` each."""
    return unit_seconds * units / 3600


def budget(cfg: Config) -> dict[str, int]:
    """Units of each stage in the paper's run: classifier steps over its epochs (the last batch of
    an epoch may be short), every training image localized and labelled, the segmenter's
    iterations, every val image scored, one export; OAA's and OAA+'s steps of batch x iter_size
    images (an epoch's incomplete step joins the next one's first); PSA's full batches (drop_last),
    and every training image through its CAMs, its confident labels and its walk."""
    c = cfg.classify
    oaa = {stage: part.epochs * (TRAIN_IMAGES // (part.batch_size * part.iter_size))
           for stage, part in (("accumulate", cfg.accumulate), ("integral", cfg.integral))}
    psa = {stage: part.epochs * (TRAIN_IMAGES // part.batch_size)
           for stage, part in (("psa_classify", cfg.psa), ("affinity", cfg.affinity))}
    return {"classify": c.epochs * math.ceil(TRAIN_IMAGES / c.batch_size), "localize": TRAIN_IMAGES,
            "pseudolabel": TRAIN_IMAGES, "segment": cfg.segment.iters, "evaluate": VAL_IMAGES, "export": 1,
            **oaa, **psa, "psa_cam": TRAIN_IMAGES, LABELS_ROW: TRAIN_IMAGES, "refine": TRAIN_IMAGES}


# ---- one stage, in its own process -------------------------------------------------------------
class Span:
    """First start, last end and count of the units a wrapped function did."""

    def __init__(self) -> None:
        self.start, self.end, self.count = math.inf, 0.0, 0

    def add(self, start: float, count: int = 1) -> None:
        self.start, self.end, self.count = min(self.start, start), time.perf_counter(), self.count + count

    def per_unit(self) -> float:
        return (self.end - self.start) / self.count


def _span_calls(module: Any, name: str, count: Callable[..., int]) -> Span:
    """Time every call of module.name; `count(*args)` units each."""
    span, inner = Span(), getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        span.add(start, count(*args))
        return result

    setattr(module, name, timed)
    return span


def _span_yields(module: Any, name: str) -> Span:
    """Time a generator module.name from its call to its last item, one unit per item."""
    span, inner = Span(), getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        for item in inner(*args, **kwargs):
            span.add(start)
            yield item

    setattr(module, name, timed)
    return span


def _step_ticks() -> list[float]:
    """The time of every training step's end (Trainer.log_step follows each update)."""
    ticks, inner = [], training.Trainer.log_step

    def log_step(self, *args, **kwargs):
        ticks.append(time.perf_counter())
        return inner(self, *args, **kwargs)

    training.Trainer.log_step = log_step
    return ticks


def _stage(stage: str, overrides: list[str], inputs: dict[str, str]) -> dict[str, Any]:
    """Run one stage (in a fresh process) and measure it."""
    cfg = load_config(CONFIG, overrides)
    ticks, caches, span, labels = _step_ticks(), [], None, None
    if stage == "localize":
        span = _span_yields(localize, "compute_maps")

        class Counted(localize.FeatureCache):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                caches.append(self)

        localize.FeatureCache = Counted
    elif stage == "pseudolabel":
        span = _span_calls(pseudolabel, "_process", lambda *a: 1)
    elif stage == "evaluate":
        span = _span_calls(evaluate, "_score_segment", lambda job, model, meta, samples, *a: len(samples))
        evaluate.SCORERS["segment"] = evaluate._score_segment  # the stage calls it through this table
    elif stage == "psa_cam":
        span = _span_calls(psa_cam, "cams", lambda *a: 1)
    elif stage == "refine":
        span = _span_calls(refine, "refine_maps", lambda *a: 1)
    elif stage == "affinity":
        labels = _span_yields(affinity, "crf_scores")
    run = importlib.import_module(f"mcis_cli.stages.{stage}").run
    start = time.perf_counter()
    result = run(cfg, **inputs)
    wall = time.perf_counter() - start
    if ticks:
        unit = float(np.diff(ticks).mean())
    else:
        unit = span.per_unit() if span else wall
    out = {"run_id": result.run_id, "outputs": result.outputs, "unit_s": unit, "wall_s": wall,
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "cuda": torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None}
    if caches:
        out |= _miss_cost(caches[0])
    if labels:
        records = engine.workdir(cfg, result.run_id) / engine.RECORDS / affinity.LABELS
        out |= {"labels_s": labels.per_unit(), "outputs": {**result.outputs, affinity.LABELS: str(records)}}
    return out


@torch.inference_mode()
def _miss_cost(cache: localize.FeatureCache) -> dict[str, Any]:
    """What a cache miss costs (loading, squashing and the backbone for one image, as the cache
    computes it: in batches of localize.feature_batch; the mean of a few) and the shape of one
    image's features; with the run's hits and misses and its peak bytes."""
    images = [i % len(cache.samples) for i in range(MISS_SAMPLES)]
    start = time.perf_counter()
    features = cache.compute(images)
    return {"miss_s": (time.perf_counter() - start) / len(images), "feature_shape": tuple(features.shape[1:]),
            "hits": cache.hits, "misses": cache.misses, "cache_peak": cache.peak}


# ---- the cache at VOC scale ------------------------------------------------------------------
class _Replay(localize.FeatureCache):
    """The stage's cache, holding meta tensors of the measured feature shape: its bookkeeping in
    bytes is the real one, nothing is computed or allocated."""

    def __init__(self, shape: tuple[int, ...], budget_mb: int):
        super().__init__(None, [], 0, torch.device("meta"), budget_mb)
        self.shape = shape

    def compute(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.empty(len(indices), *self.shape, device="meta")


def replay_cache(cfg: Config, shape: tuple[int, ...]) -> dict[str, float]:
    """The localize stage's cache requests (each batch's own images, then their partners) for
    10,582 images with VOC's label counts, classes drawn uniformly: its peak bytes, the entries
    that fit, the misses per image and the features one batch holds beyond the budget."""
    lc = cfg.localize
    rng = np.random.default_rng(cfg.seed)
    counts = rng.choice(list(VOC_LABEL_COUNTS), TRAIN_IMAGES, p=np.array(list(VOC_LABEL_COUNTS.values())) / TRAIN_IMAGES)
    samples = [voc.Sample(f"{i:06d}", Path(), tuple(sorted(int(c) for c in rng.choice(20, k, replace=False))))
               for i, k in enumerate(counts)]
    items = localize.plan(samples, lc.partners, cfg.seed)
    cache = _Replay(shape, lc.cache_mb)
    held = 0
    for start in range(0, len(items), lc.batch_size):
        chunk = items[start : start + lc.batch_size]
        partners = [j for item in chunk for js in item.partners for j in js]
        held = max(held, len(cache.get([item.index for item in chunk])) + len(cache.get(partners)))
    entry = math.prod(shape) * 4
    return {"entry": entry, "fit": cache.budget // entry, "peak": cache.peak, "budget": cache.budget,
            "misses_per_image": cache.misses / TRAIN_IMAGES, "hit_rate": cache.hits / (cache.hits + cache.misses),
            "held": held * entry}


# ---- the table -------------------------------------------------------------------------------
def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _copies(tmp: Path, root: Path, folder: Path) -> int:
    """How many copies of a stage's per-image files are on disk (its run folder, the local store):
    the files of its first image's name and bytes (every maps stage names its files <id>.npz)."""
    first = next(folder.iterdir())
    content = first.read_bytes()
    return sum(1 for f in tmp.rglob(first.name) if not f.is_relative_to(root) and f.read_bytes() == content)


def _disk(run: dict[str, Any], units: int, per_image: float | None, copies: int) -> float:
    """Projected bytes: what the stage wrote, its per-image files scaled to `units` images."""
    if per_image is None:
        return run["disk"]
    return run["disk"] + copies * per_image * (units - N_TRAIN)


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "?"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPUs ({model}){gpu}, {torch.get_num_threads()} torch threads"


def chain(wanted: Sequence[str]) -> tuple[str, ...]:
    """The stages `wanted` and every stage they read, in STAGES order."""
    needed, todo = set(), list(wanted)
    while todo:
        stage = todo.pop()
        if stage not in STAGES:
            raise SystemExit(f"no stage {stage!r} in the bench; choose from {', '.join(STAGES)}")
        needed.add(stage)
        todo += INPUTS.get(stage, {}).values()
    return tuple(s for s in STAGES if s in needed)


def main(sets: Sequence[str] = (), stages: Sequence[str] = STAGES) -> dict[str, dict[str, Any]]:
    console = Console(width=max(Console().width, 120))
    load = os.getloadavg()[0]
    with scratch_store() as tmp:
        root = tmp / "VOC2012"
        synth.write(root, profile="voc", seed=0, n_train=N_TRAIN, n_val=N_VAL)
        overrides = [f"data.root={root}", f"output_dir={tmp / 'runs'}", *COUNTS, *sets]
        cfg = load_config(CONFIG, [f"data.root={root}", *sets])  # the recipe's counts, for the budget
        runs: dict[str, dict[str, Any]] = {}
        for stage in chain(stages):
            before = _bytes(tmp)
            inputs = {arg: runs[source]["run_id"] for arg, source in INPUTS.get(stage, {}).items()}
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                runs[stage] = pool.submit(_stage, stage, overrides, inputs).result()
            runs[stage]["disk"] = _bytes(tmp) - before
            console.print(f"{stage}: {runs[stage]['wall_s']:.0f} s", highlight=False)
        if "affinity" in runs:  # its labels' share of the stage: the same process, their files
            runs[LABELS_ROW] = {**runs["affinity"], "unit_s": runs["affinity"]["labels_s"], "disk": 0}
        per_image = {stage: _bytes(Path(runs[stage]["outputs"][name])) / N_TRAIN
                     for stage, name in PER_IMAGE if stage in runs}
        copies = {stage: _copies(tmp, root, Path(runs[stage]["outputs"][name]))
                  for stage, name in PER_IMAGE if stage in runs}
        gt_png = _bytes(root / voc.MASKS) / (N_TRAIN + N_VAL)
    rows = [row for row in ROWS if row in runs]
    loc = runs.get("localize")
    if loc:
        cache = replay_cache(cfg, loc["feature_shape"])
        measured_misses = loc["misses"] / N_TRAIN
        loc["unit_s"] += max(0.0, cache["misses_per_image"] - measured_misses) * loc["miss_s"]
        loc["rss"] += cache["peak"] - loc["cache_peak"] + cache["held"]

    units = budget(cfg)
    gpu = any(r["cuda"] is not None for r in runs.values())
    table = Table(title=f"{CONFIG.name} at full size, projected to the paper's budget "
                        f"({_machine()}, {devices.select_device(cfg.device).type}, "
                        f"1-min load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")
    columns = ["stage", "unit", "s / unit", "units", "hours", "peak RSS GiB",
               *(["CUDA GiB"] if gpu else []), "bytes / image", "disk GB"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "unit") else "right")
    total_h = total_disk = 0.0
    for stage in rows:
        r, n = runs[stage], units[stage]
        hours = project(r["unit_s"], n)
        disk = _disk(r, n, per_image.get(stage), copies.get(stage, 0))
        total_h, total_disk = total_h + hours, total_disk + disk
        rss = f"{r['rss'] / 2**30:.2f}"
        cells = [stage, UNIT[stage], f"{r['unit_s']:.2f}", f"{n:,}", f"{hours:.1f}",
                 rss if r["rss"] < RSS_LIMIT else f"[red]{rss}[/]",
                 *([f"{r['cuda'] / 2**30:.2f}" if r["cuda"] else ""] if gpu else []),
                 f"{per_image[stage] / 1e3:.1f} kB" if stage in per_image else "", f"{disk / 1e9:.2f}"]
        table.add_row(*cells)
    table.add_row("total", "", "", "", f"{total_h:.1f}", f"{max(r['rss'] for r in runs.values()) / 2**30:.2f}",
                  *([""] if gpu else []), "", f"{total_disk / 1e9:.1f}", style="bold")
    console.print(table)
    over = [s for s in rows if runs[s]["rss"] >= RSS_LIMIT]
    per_image_rows = "/".join(stage for stage, _ in PER_IMAGE if stage in runs)
    console.print(
        f"peak RSS: {'over 24 GiB: ' + ', '.join(over) if over else 'every stage under 24 GiB'} "
        f"(the stage's own process; CRF workers not counted). disk: what the stage wrote (its run folder "
        f"and the local MLflow copy), per image x images for {per_image_rows} (copies: "
        f"{', '.join(f'{k} {v}' for k, v in copies.items())}); a ground-truth mask PNG of this tree is "
        f"{gt_png / 1e3:.1f} kB. Training steps exclude the first.", highlight=False)
    if loc:
        console.print(
            f"localize s/image adds the VOC-scale misses at {loc['miss_s']:.2f} s each, and its RSS its full "
            f"cache: {cache['entry'] / 2**20:.1f} MiB per image ({'x'.join(map(str, loc['feature_shape']))} "
            f"float32 at {cfg.classify.input_size} px, width {cfg.classify.width}); localize.cache_mb "
            f"{cfg.localize.cache_mb} holds {cache['fit']:,} of {TRAIN_IMAGES:,} images; peak "
            f"{cache['peak'] / 2**20:,.0f} MiB <= {cache['budget'] / 2**20:,.0f} MiB; hit rate "
            f"{cache['hit_rate']:.1%}, {cache['misses_per_image']:.2f} misses per image; one batch holds "
            f"{cache['held'] / 2**20:,.0f} MiB more while it runs.", highlight=False)
    return runs


def _values(argv: Sequence[str], option: str) -> list[str]:
    """The values given to `option` (`--set KEY=VALUE`, `--stages a,b`)."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


if __name__ == "__main__":
    wanted = [s for value in _values(sys.argv[1:], "--stages") for s in value.split(",")]
    main(_values(sys.argv[1:], "--set"), wanted or STAGES)
