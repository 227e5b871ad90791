"""`mcis pipeline`: every stage in order under one parent MLflow run, then the results table.

Like IRN's run_sample.py, this is only a driver: each step calls a stage's `run(...)`. A step whose
nested run already FINISHED under an unfinished parent of the same config is reused, so a re-run
after a failure resumes from the last finished stage.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mcis_cli import tracking
from mcis_cli.config import Config
from mcis_cli.stages import StageResult

STEP_TAG = "mcis.step"


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]


def _with(cfg: Config, **sections) -> Config:
    """A copy of cfg with some section fields replaced, e.g. _with(cfg, classify={"method": "cam"})."""
    tree = cfg.model_dump()
    for section, fields in sections.items():
        tree[section].update(fields)
    return Config.model_validate(tree)


def ensure_data(cfg: Config, console: Console) -> None:
    root = Path(cfg.data.root)
    if root.exists():
        return
    if cfg.data.synth is None:
        from mcis_cli.errors import McisError

        raise McisError(f"data root {root} does not exist (point data.root at a VOC2012 folder)")
    from mcis_cli.data import synth

    s = cfg.data.synth
    console.print(f"writing the embedded dataset to {root}")
    synth.write(root, seed=s.seed, n_train=s.n_train, n_val=s.n_val, size=s.size,
                n_extra=s.n_extra, n_web=s.n_web)


def steps(cfg: Config) -> list[tuple[str, Callable[[dict[str, StageResult], str], StageResult]]]:
    """(name, call) in order; each call gets the results so far and the parent run id."""
    from mcis_cli.stages import classify, evaluate, export, localize, pseudolabel, segment

    cam = _with(cfg, classify={"method": "cam"}, localize={"method": "cam"})
    return [
        ("classify", lambda r, p: classify.run(cfg, parent=p)),
        ("localize", lambda r, p: localize.run(cfg, from_run=r["classify"].run_id, parent=p)),
        ("pseudolabel", lambda r, p: pseudolabel.run(cfg, from_run=r["localize"].run_id, parent=p)),
        ("segment", lambda r, p: segment.run(cfg, from_run=r["pseudolabel"].run_id, parent=p)),
        ("evaluate", lambda r, p: evaluate.run(cfg, from_run=r["segment"].run_id, parent=p)),
        ("export", lambda r, p: export.run(cfg, from_run=r["segment"].run_id, parent=p)),
        ("classify_cam", lambda r, p: classify.run(cam, parent=p)),
        ("localize_cam", lambda r, p: localize.run(cam, from_run=r["classify_cam"].run_id, parent=p)),
        ("segment_gt", lambda r, p: segment.run(cfg, labels="gt", parent=p)),
        ("evaluate_gt", lambda r, p: evaluate.run(cfg, from_run=r["segment_gt"].run_id, parent=p)),
    ]


def run(cfg: Config, ablation: bool = False, console: Console | None = None) -> dict[str, StageResult]:
    console = console or Console()
    ensure_data(cfg, console)
    digest = config_hash(cfg)
    unfinished = tracking.find_runs(cfg, "pipeline", finished=False, **{"mcis.config_hash": digest})
    resume = unfinished[0].run_id if unfinished else None
    results: dict[str, StageResult] = {}
    started = time.time()
    with tracking.stage_run(cfg, "pipeline", resume=resume, run_name="pipeline") as parent:
        parent.set_tags({"mcis.config_hash": digest})
        done = tracking.finished_children(cfg, parent.run_id, STEP_TAG) if resume else {}
        for name, call in steps(cfg):
            if name in done:
                console.print(f"[dim]{name}: reusing finished run {done[name].run_id}[/]")
                results[name] = StageResult(done[name].run_id, done[name].metrics)
                continue
            console.rule(f"[bold]{name}")
            results[name] = call(results, parent.run_id)
            tracking.set_run_tags(cfg, results[name].run_id, {STEP_TAG: name})
        table = results_table(results)
        parent.log_metrics(summary_metrics(results), step=0)
        parent.log_text(markdown(table), "results.md")
        if ablation:
            ablation_table = run_ablation(cfg, parent, console)
    console.print(table)
    if ablation:
        console.print(ablation_table)
    console.print(f"pipeline finished in {time.time() - started:.0f} s, parent run {parent.run_id}")
    return results


def summary_metrics(results: dict[str, StageResult]) -> dict[str, float]:
    rows = _rows(results)
    return {key: value for _, key, value in rows if value is not None}


def _metric(results: dict[str, StageResult], step: str, key: str) -> float | None:
    result = results.get(step)
    return None if result is None else result.metrics.get(key)


def _rows(results: dict[str, StageResult]) -> list[tuple[str, str, float | None]]:
    m = lambda step, key: _metric(results, step, key)  # noqa: E731
    seg, ceiling = m("evaluate", "miou"), m("evaluate_gt", "miou")
    return [
        ("localize (CAM baseline)", "maps/miou", m("localize_cam", "maps/miou")),
        ("localize (MCIS)", "maps/miou", m("localize", "maps/miou")),
        ("pseudolabel", "pseudo/miou", m("pseudolabel", "pseudo/miou")),
        ("pseudolabel (share of pixels ignored)", "pseudo/ignore_frac", m("pseudolabel", "pseudo/ignore_frac")),
        ("segment (val, no CRF)", "seg/miou_nocrf", m("evaluate", "miou_nocrf")),
        ("segment (val, CRF)", "seg/miou", seg),
        ("fully supervised ceiling (val, CRF)", "ceiling/miou", ceiling),
        ("fraction of the ceiling", "ceiling/fraction", seg / ceiling if seg and ceiling else None),
        ("export", "parity/max_abs_diff", m("export", "parity/max_abs_diff")),
        ("export", "speed/ort_over_torch", m("export", "speed/ort_over_torch")),
    ]


def results_table(results: dict[str, StageResult]) -> Table:
    table = Table(title="MCIS on this dataset", header_style="bold")
    for column in ("stage", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for stage, key, value in _rows(results):
        table.add_row(stage, key, "-" if value is None else f"{value:.4f}")
    return table


def markdown(table: Table) -> str:
    lines = ["| " + " | ".join(c.header for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    cells = [list(c.cells) for c in table.columns]
    for row in zip(*cells, strict=True):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ---- ablation -------------------------------------------------------------------------------
ABLATION_SEEDS = (0, 1, 2)


def ablation_variants(cfg: Config) -> list[tuple[str, Config]]:
    """The paper's component ablation, each variant a (classify, localize) config pair."""
    off = {"coattention": False, "contrastive": False, "self_pairs": False}
    variants = [
        ("plain CAM", _with(cfg, classify={"method": "cam"}, localize={"method": "cam"})),
        ("+ co-attention", _with(cfg, classify={**off, "coattention": True},
                                 localize={"self_pairs": False})),
        ("+ contrastive", _with(cfg, classify={**off, "coattention": True, "contrastive": True},
                                localize={"self_pairs": False})),
        ("+ self-pairs (MCIS)", cfg),
    ]
    variants += [(f"MCIS, {k} partners", _with(cfg, localize={"partners": k})) for k in (1, 5)]
    return variants


def run_ablation(cfg: Config, parent: tracking.Tracker, console: Console) -> Table:
    """Train and localize every variant for every seed; log the spread and a chart."""
    import numpy as np

    from mcis_cli import plots
    from mcis_cli.stages import classify, localize

    scores: dict[str, list[float]] = {}
    trained: dict[str, str] = {}  # classify section + seed -> run id, shared across variants
    for name, variant in ablation_variants(cfg):
        for seed in ABLATION_SEEDS:
            seeded = variant.model_copy(update={"seed": seed})
            key = f"{seeded.classify.model_dump_json()}/{seed}"
            console.rule(f"[bold]ablation: {name}, seed {seed}")
            if key not in trained:
                trained[key] = classify.run(seeded, parent=parent.run_id).run_id
            maps = localize.run(seeded, from_run=trained[key], parent=parent.run_id)
            tracking.set_run_tags(seeded, maps.run_id, {"mcis.ablation": name})
            scores.setdefault(name, []).append(maps.metrics["maps/miou"])
    table = Table(title="Ablation: localization-map mIoU over seeds", header_style="bold")
    for column in ("variant", "mean", "std", "runs"):
        table.add_column(column)
    for index, (name, values) in enumerate(scores.items()):
        mean, std = float(np.mean(values)), float(np.std(values))
        table.add_row(name, f"{mean:.4f}", f"{std:.4f}", str(len(values)))
        parent.log_metrics({"ablation/mean": mean, "ablation/std": std}, step=index)
    parent.log_text(markdown(table), "ablation.md")
    parent.log_figure(plots.ablation_chart(scores), "ablation.png")
    return table
