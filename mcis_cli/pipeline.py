"""`mcis pipeline`: every stage in order under one parent MLflow run, then the results table.

Like IRN's run_sample.py, this is only a driver: each step calls a stage's `run(...)`. The parent
run resumes as every stage does (the engine's key, here the whole config): a re-run after a
failure reopens the unfinished parent, reuses the steps it finished (ablation steps included), and
the step that failed continues its own unfinished run. `run_seeds` runs the whole pipeline once per
held-out data seed, each nested under one `seeds` parent, and reports mean ± std over them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.rule import Rule
from rich.table import Table

from mcis_cli import engine, methods, reporting, tracking
from mcis_cli.config import Config
from mcis_cli.errors import McisError
from mcis_cli.progress import out
from mcis_cli.stages import StageResult

ABLATION_TAG = "mcis.ablation"
DATA_SEED_TAG = "mcis.data_seed"  # the embedded tree's data.synth.seed


def ensure_data(cfg: Config) -> None:
    root = Path(cfg.data.root)
    if root.exists():
        return
    if cfg.data.synth is None:
        raise McisError(f"data root {root} does not exist (point data.root at a VOC2012 folder)")
    from mcis_cli.data import synth

    s = cfg.data.synth
    out.print(f"writing the embedded dataset to {root}")
    synth.write(root, seed=s.seed, n_train=s.n_train, n_val=s.n_val, size=s.size,
                n_extra=s.n_extra, n_web=s.n_web)


class Steps:
    """Runs named steps as nested runs of the parent, reusing those an earlier start finished.

    Each step's run is created named after the step and tagged with it (`tracking.Nest`), so the
    compare view tells `segment` from `segment_gt`, and a half-done step is never taken for another.
    """

    def __init__(self, job: engine.Job):
        self.job, self.done = job, job.finished_steps()
        self.ran: dict[str, StageResult] = {}  # this start's: a step two chains share runs once

    def __call__(self, name: str, call: Callable[[tracking.Nest], StageResult], **tags: str) -> StageResult:
        if name in self.ran:
            return self.ran[name]
        if name in self.done:
            self.job.print(f"[dim]{name}: reusing finished run {self.done[name].run_id}[/]")
            result = StageResult(self.done[name].run_id, self.done[name].metrics)
        else:
            self.job.print(Rule(f"[bold]{name}"))
            result = call(tracking.Nest(self.job.run_id, name, tags))
        self.ran[name] = result
        return result


def method_steps(cfg: Config, step: Steps) -> dict[str, StageResult]:
    """The method, then (pipeline.baselines) the plain-CAM baseline and the supervised ceiling."""
    from mcis_cli.stages import classify, evaluate, export, localize, pseudolabel, segment

    r: dict[str, StageResult] = {}
    r["classify"] = step("classify", lambda p: classify.run(cfg, parent=p))
    r["localize"] = step("localize", lambda p: localize.run(cfg, from_run=r["classify"].run_id, parent=p))
    r["pseudolabel"] = step("pseudolabel", lambda p: pseudolabel.run(cfg, from_run=r["localize"].run_id, parent=p))
    r["segment"] = step("segment", lambda p: segment.run(cfg, from_run=r["pseudolabel"].run_id, parent=p))
    r["evaluate"] = step("evaluate", lambda p: evaluate.run(cfg, from_run=r["segment"].run_id, parent=p))
    r["export"] = step("export", lambda p: export.run(cfg, from_run=r["segment"].run_id, parent=p))
    if not cfg.pipeline.baselines:
        return r
    cam = methods.cam_config(cfg)
    r["classify_cam"] = step("classify_cam", lambda p: classify.run(cam, parent=p))
    r["localize_cam"] = step("localize_cam", lambda p: localize.run(cam, from_run=r["classify_cam"].run_id, parent=p))
    r["pseudolabel_cam"] = step("pseudolabel_cam", lambda p: pseudolabel.run(cam, from_run=r["localize_cam"].run_id, parent=p))
    r["segment_gt"] = step("segment_gt", lambda p: segment.run(cfg, labels="gt", parent=p))
    r["evaluate_gt"] = step("evaluate_gt", lambda p: evaluate.run(cfg, from_run=r["segment_gt"].run_id, parent=p))
    return r


def comparison_steps(cfg: Config, step: Steps) -> dict[str, dict[str, StageResult]]:
    """Each method's chain to its maps, then the steps every method shares; the supervised
    ceiling once."""
    from mcis_cli.stages import evaluate, segment

    results = {name: shared_steps(cfg, name, methods.METHODS[name](cfg, step), step) for name in cfg.pipeline.methods}
    gt = step("segment_gt", lambda p: segment.run(cfg, labels="gt", parent=p))
    results["ceiling"] = {"evaluate": step("evaluate_gt", lambda p: evaluate.run(cfg, from_run=gt.run_id, parent=p))}
    return results


def shared_steps(cfg: Config, name: str, maps: StageResult, step: Steps) -> dict[str, StageResult]:
    """From a method's maps on: its own pseudo-mask rule, then the one segmenter recipe and the one
    evaluation (masks saved, for the figure)."""
    from mcis_cli.stages import evaluate, pseudolabel, segment

    tag = {tracking.METHOD_TAG: name}
    scored = cfg.replace(evaluate={"save_masks": True})
    masks = step(f"{name}/pseudolabel", lambda p: pseudolabel.run(cfg, from_run=maps.run_id, parent=p), **tag)
    model = step(f"{name}/segment", lambda p: segment.run(cfg, from_run=masks.run_id, parent=p), **tag)
    scores = step(f"{name}/evaluate", lambda p: evaluate.run(scored, from_run=model.run_id, parent=p), **tag)
    return {"maps": maps, "pseudolabel": masks, "segment": model, "evaluate": scores}


COMPARED = [  # (what, key, step, the step's metric) of every method
    ("localization maps (train)", "maps_miou", "maps", "maps/miou"),
    ("pseudo masks (train)", "pseudo_miou", "pseudolabel", "pseudo/miou"),
    ("pseudo masks: precision", "pseudo_precision", "pseudolabel", "pseudo/precision"),
    ("pseudo masks: recall", "pseudo_recall", "pseudolabel", "pseudo/recall"),
    ("pseudo masks: share of pixels ignored", "pseudo_ignore_frac", "pseudolabel", "pseudo/ignore_frac"),
    ("segmentation (val, no CRF)", "seg/miou_nocrf", "evaluate", "miou_nocrf"),
    ("segmentation (val, CRF)", "seg/miou", "evaluate", "miou"),
]
PAIRED = ("maps_miou", "pseudo_miou", "seg/miou")  # the keys the seeds' paired differences compare


def comparison_rows(names: list[str], results: dict[str, dict[str, StageResult]]) -> list[tuple[str, str, float | None]]:
    """(what, `<method>/<key>`, value) for every method, then the ceiling: the comparison's table
    and its parent run's metrics."""
    def m(method: str, step: str, key: str) -> float | None:
        found = results.get(method, {}).get(step)
        return found.metrics.get(key) if found else None

    ceiling = m("ceiling", "evaluate", "miou")
    rows = []
    for name in names:
        prefix = methods.metric_prefix(name)
        rows += [(f"{name}: {what}", f"{prefix}/{key}", m(name, step, metric)) for what, key, step, metric in COMPARED]
        seg = m(name, "evaluate", "miou")
        rows.append((f"{name}: fraction of the ceiling reached", f"{prefix}/ceiling_fraction",
                     seg / ceiling if seg is not None and ceiling else None))
    return [*rows, ("fully supervised ceiling (val, CRF)", "ceiling/miou", ceiling)]


def comparison_table(names: list[str], rows: list[tuple[str, str, float | None]]) -> Table:
    """One row a measure, one column a method."""
    values = {key: value for _, key, value in rows}

    def cell(key: str) -> str:
        value = values.get(key)
        return "-" if value is None else f"{value:.4f}"

    measures = [(what, key) for what, key, *_ in COMPARED] + [("fraction of the ceiling reached", "ceiling_fraction")]
    body = [(what, *(cell(f"{methods.metric_prefix(name)}/{key}") for name in names)) for what, key in measures]
    body.append(("fully supervised ceiling (val, CRF)", *[cell("ceiling/miou")] * len(names)))
    return reporting.table(("measure", *names), body, title="Methods compared on this dataset (mIoU unless named)")


def comparison_figure(cfg: Config, names: list[str], results: dict[str, dict[str, StageResult]]):
    """The MCIS paper's figure: rows of validation images, columns image | ground truth | each
    method's segmentation (the masks its evaluate run saved)."""
    from mcis_cli.data import transforms, voc
    from mcis_cli.stages.evaluate import overlay_ids

    samples = voc.split_samples(cfg.data.root, cfg.data.val_list)
    shown = overlay_ids(samples, cfg.evaluate.overlays)
    folders = {name: tracking.get_run(cfg, results[name]["evaluate"].run_id, "evaluate").fetch("masks") for name in names}
    rows = [[transforms.load_image(s.image), voc.load_mask(cfg.data.root, s.id),
             *(transforms.read_index_png(folders[name] / f"{s.id}.png") for name in names)]
            for s in samples if s.id in shown]
    return reporting.overlay_figure(rows, ["background", *voc.class_names(cfg.data.root)],
                                    columns=("image", "ground truth", *names))


def setting1_metrics(cfg: Config) -> dict[str, float] | None:
    """Summary metrics of the latest finished pipeline of `pipeline.compare_to` (setting 1) on the
    same data seed: a gain is only meaningful against the same images."""
    name = cfg.pipeline.compare_to
    if not name:
        return None
    same_data = {DATA_SEED_TAG: str(cfg.data.synth.seed)} if cfg.data.synth else {}
    runs = tracking.find_runs(cfg.replace(tracking={"experiment": name}), "pipeline", **same_data)
    if not runs:
        on = f" on data seed {cfg.data.synth.seed}" if cfg.data.synth else ""
        out.print(f"[yellow]warning:[/] no finished pipeline in experiment {name!r}{on} to compare "
                      f"with; run `mcis pipeline --config configs/{name}.yaml` first")
        return {}
    return runs[0].metrics


PIPELINE = engine.Stage("pipeline", sections=None)
SEEDS = engine.Stage("seeds", sections=None)


def run(cfg: Config, ablation: bool = False, parent: tracking.Nest | None = None) -> StageResult:
    """The pipeline's parent run (nested under `parent` when given) with the results table's
    values as its metrics."""
    names = methods.check(cfg.pipeline.methods)
    job = engine.start(PIPELINE, cfg, parent=parent)
    job.first(lambda: ensure_data(cfg))
    started = time.time()
    tags = {DATA_SEED_TAG: str(cfg.data.synth.seed)} if cfg.data.synth else {}
    if names:
        tags["mcis.methods"] = ",".join(names)
    with job.open(tags=tags, run_name=f"pipeline {parent.step}" if parent else "pipeline"):
        step = Steps(job)
        if names:
            results = comparison_steps(cfg, step)
            rows = comparison_rows(names, results)
            table = comparison_table(names, rows)
        else:
            results = method_steps(cfg, step)
            rows = result_rows(results, job.report(lambda log: setting1_metrics(cfg)), cfg.pipeline.compare_to)
            table = results_table(rows)
        summary = {key: value for _, key, value in rows if value is not None}
        job.report(lambda log: (log.log_metrics(summary, step=0), log.log_text(reporting.markdown(table), "results.md")))
        if names:
            job.report(lambda log: log.log_figure(comparison_figure(cfg, names, results), "comparison.png"))
        if ablation:
            ablation_table = run_ablation(cfg, step, results)
    job.print(table)
    if ablation:
        job.print(ablation_table)
    job.print(f"pipeline finished in {time.time() - started:.0f} s, parent run {job.run_id}")
    return job.result(summary)


def result_rows(results: dict[str, StageResult], setting1: dict[str, float] | None = None,
                setting1_name: str | None = None) -> list[tuple[str, str, float | None]]:
    """(what, summary key, value) for the results table and the parent run's metrics."""
    def m(step: str, key: str) -> float | None:
        return results[step].metrics.get(key) if step in results else None

    seg, ceiling = m("evaluate", "miou"), m("evaluate_gt", "miou")
    rows = [
        ("localization maps, CAM baseline (train)", "cam/maps_miou", m("localize_cam", "maps/miou")),
        ("localization maps, MCIS (train)", "mcis/maps_miou", m("localize", "maps/miou")),
        ("CAM maps: hot region off the object", "cam/maps_hot_off_object", m("localize_cam", "maps/hot_off_object")),
        ("CAM maps: share of part pixels hot", "cam/maps_part_recall", m("localize_cam", "maps/part_recall")),
        ("CAM maps: share of body pixels hot", "cam/maps_body_recall", m("localize_cam", "maps/body_recall")),
        ("MCIS maps: hot region off the object", "mcis/maps_hot_off_object", m("localize", "maps/hot_off_object")),
        ("MCIS maps: share of part pixels hot", "mcis/maps_part_recall", m("localize", "maps/part_recall")),
        ("MCIS maps: share of body pixels hot", "mcis/maps_body_recall", m("localize", "maps/body_recall")),
        ("computed saliency: foreground IoU (train)", "saliency/fg_iou", m("pseudolabel", "saliency/fg_iou")),
        ("pseudo masks from CAM maps (train)", "cam/pseudo_miou", m("pseudolabel_cam", "pseudo/miou")),
        ("pseudo masks, MCIS (train)", "mcis/pseudo_miou", m("pseudolabel", "pseudo/miou")),
        ("pseudo masks, MCIS: precision", "mcis/pseudo_precision", m("pseudolabel", "pseudo/precision")),
        ("pseudo masks, MCIS: recall", "mcis/pseudo_recall", m("pseudolabel", "pseudo/recall")),
        ("pseudo masks, MCIS: share of pixels ignored", "mcis/pseudo_ignore_frac", m("pseudolabel", "pseudo/ignore_frac")),
        ("segmentation on pseudo masks (val, no CRF)", "seg/miou_nocrf", m("evaluate", "miou_nocrf")),
        ("segmentation on pseudo masks (val, CRF)", "seg/miou", seg),
        ("fully supervised ceiling (val, CRF)", "ceiling/miou", ceiling),
        ("fraction of the ceiling reached", "ceiling/fraction", seg / ceiling if seg and ceiling else None),
        ("ONNX export: max |ORT - PyTorch| logit", "export/max_abs_diff", m("export", "parity/max_abs_diff")),
    ]
    if setting1 is not None:
        before = setting1.get("seg/miou")
        rows += [
            (f"setting 1 ({setting1_name}): segmentation (val, CRF)", "setting1/seg_miou", before),
            ("gain over setting 1: segmentation (val, CRF)", "gain/seg_miou",
             seg - before if seg is not None and before is not None else None),
        ]
    return rows


def results_table(rows: list[tuple[str, str, float | None]]) -> Table:
    return reporting.table(("stage", "metric", "value"),
                           ((stage, key, "-" if value is None else f"{value:.4f}") for stage, key, value in rows),
                           title="MCIS on this dataset (mIoU unless named)", left=2)


# ---- held-out data seeds --------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """`--seeds 100,101,102` as a list of distinct ints."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise McisError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 100,101,102") from None
    if len(set(seeds)) != len(seeds):
        raise McisError(f"--seeds {text!r} names a seed twice")
    return seeds


def seeded(cfg: Config, seed: int) -> Config:
    """The config on the embedded tree written with data seed `seed`, in a folder of its own
    (`<data.root>-seed<k>`): its own data, so its own config hash, so its own resumable pipeline."""
    if cfg.data.synth is None:
        raise McisError(f"--seeds needs the embedded dataset (a data.synth section); config {cfg.name!r} "
                        f"reads the fixed dataset at {cfg.data.root}")
    root = Path(cfg.data.root)
    return cfg.replace(data={"root": str(root.with_name(f"{root.name}-seed{seed}")),
                             "synth": {**cfg.data.synth.model_dump(), "seed": seed}})


def run_seeds(cfg: Config, seeds: list[int]) -> dict[int, dict[str, float]]:
    """One pipeline per data seed, nested under a `seeds` parent run that logs every results-table
    key's `<key>_mean` and `<key>_std` over the seeds and the table as `seeds.md`.

    A re-run of the same config and seeds reopens the unfinished parent: a seed whose pipeline
    finished is read back, the one that failed resumes at its last finished step."""
    configs = {seed: seeded(cfg, seed) for seed in seeds}  # refuse real data before opening a run
    listed = ",".join(map(str, seeds))
    job = engine.start(SEEDS, cfg, extra={"seeds": listed})
    with job.open(tags={"mcis.data_seeds": listed}, run_name="seeds"):
        done = job.finished_steps()
        columns = {}
        for seed, seeded_cfg in configs.items():
            name = f"seed{seed}"
            if name in done:
                job.print(f"[dim]data seed {seed}: reusing finished pipeline {done[name].run_id}[/]")
                columns[seed] = done[name].metrics
                continue
            job.print(Rule(f"[bold]data seed {seed}: {seeded_cfg.data.root}"))
            columns[seed] = run(seeded_cfg, parent=tracking.Nest(job.run_id, name)).metrics
        rows = seed_rows(cfg, columns)
        table = seeds_table(rows, seeds, bool(cfg.pipeline.methods))
        paired = paired_rows(cfg.pipeline.methods, columns)
        job.report(lambda log: (
            log.log_metrics({f"{r.key}_{what}": value for r in rows if r.mean is not None
                             for what, value in (("mean", r.mean), ("std", r.std))}, step=0),
            log.log_text(reporting.markdown(table), "seeds.md")))
        if paired:
            pairs_table = paired_table(paired, seeds)
            job.report(lambda log: (
                log.log_metrics({f"paired/{r.key}_mean_diff": r.mean for r in paired if r.mean is not None}, step=0),
                log.log_text(reporting.markdown(pairs_table), "paired.md")))
    job.print(table)
    if paired:
        job.print(pairs_table)
    job.print(f"{len(seeds)} data seeds finished, parent run {job.run_id}")
    return columns


@dataclass(frozen=True)
class SeedRow:
    what: str
    key: str
    values: list[float | None]  # one per data seed
    mean: float | None  # None unless every seed has the value
    std: float | None  # population std (ddof 0), as the ablation's


def seed_rows(cfg: Config, columns: dict[int, dict[str, float]]) -> list[SeedRow]:
    """The results table's rows (the comparison's with --methods), a value per data seed, with
    their mean and std."""
    rows = []
    names = cfg.pipeline.methods
    listed = comparison_rows(names, {}) if names else result_rows(
        {}, {} if cfg.pipeline.compare_to else None, cfg.pipeline.compare_to)
    for what, key, _ in listed:
        values = [column.get(key) for column in columns.values()]
        known = None not in values
        rows.append(SeedRow(what, key, values, float(np.mean(values)) if known else None,
                            float(np.std(values)) if known else None))
    return rows


def _cell(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


def seeds_table(rows: list[SeedRow], seeds: list[int], compared: bool = False) -> Table:
    what = "Methods compared" if compared else "MCIS"
    return reporting.table(
        ("stage", "metric", *(f"seed {seed}" for seed in seeds), "mean", "std"),
        ((r.what, r.key, *map(_cell, [*r.values, r.mean, r.std])) for r in rows),
        title=f"{what} over {len(seeds)} held-out data seeds (mIoU unless named)", left=2)


@dataclass(frozen=True)
class PairedRow:
    first: str
    second: str
    measure: str  # a PAIRED key
    key: str  # metric-safe: <first>-<second>/<measure>
    diffs: list[float | None]  # first - second, per data seed
    mean: float | None  # None unless every seed has both

    @property
    def wins(self) -> tuple[int, int]:
        """Seeds where the first is above the second, and where it is below."""
        known = [d for d in self.diffs if d is not None]
        return sum(d > 0 for d in known), sum(d < 0 for d in known)


def paired_rows(names: list[str], columns: dict[int, dict[str, float]]) -> list[PairedRow]:
    """Every pair of methods on the same data seeds: the difference per seed of each PAIRED
    measure, its mean, and how many seeds go either way."""
    rows = []
    for measure in PAIRED:
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                a, b = (f"{methods.metric_prefix(n)}/{measure}" for n in (first, second))
                diffs = [c[a] - c[b] if a in c and b in c else None for c in columns.values()]
                mean = None if None in diffs else float(np.mean(diffs))
                key = f"{methods.metric_prefix(first)}-{methods.metric_prefix(second)}/{measure}"
                rows.append(PairedRow(first, second, measure, key, diffs, mean))
    return rows


def paired_table(rows: list[PairedRow], seeds: list[int]) -> Table:
    return reporting.table(
        ("measure", "first - second", *(f"seed {seed}" for seed in seeds), "mean", "first above", "first below"),
        ((r.measure, f"{r.first} - {r.second}", *(_cell(d, "+") for d in [*r.diffs, r.mean]), *map(str, r.wins))
         for r in rows),
        title=f"Paired differences over {len(seeds)} data seeds (same seed, same images)", left=2)


# ---- ablation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    key: str  # metric-name safe
    name: str
    cfg: Config


def ablation_variants(cfg: Config) -> list[Variant]:
    """The paper's component ablation, then the number of partners at test time."""
    off = {"coattention": False, "contrastive": False, "self_pairs": False}
    return [
        Variant("cam", "plain CAM", methods.cam_config(cfg)),
        Variant("coatt", "+ co-attention", cfg.replace(classify={**off, "coattention": True},
                                                    localize={"self_pairs": False})),
        Variant("contrast", "+ contrastive co-attention",
                cfg.replace(classify={**off, "coattention": True, "contrastive": True},
                            localize={"self_pairs": False})),
        *(Variant(f"mcis_p{k}", f"+ self-pairs (MCIS), {k} partner{'s' * (k > 1)}", cfg.replace(localize={"partners": k}))
          for k in (1, 3, 5)),
    ]


def run_ablation(cfg: Config, step: Steps, results: dict[str, StageResult]) -> Table:
    """Train, localize and pseudo-label every variant for every seed; log the spread and a chart.

    A classifier is trained once per (classify section, seed): the partner-count variants share
    one, and the pipeline's own classify runs serve the variants they equal at the config's seed.
    """
    from mcis_cli.stages import classify, localize, pseudolabel

    trained = {(cfg.classify.model_dump_json(), cfg.seed): results["classify"].run_id}
    if "classify_cam" in results:
        trained[(methods.cam_config(cfg).classify.model_dump_json(), cfg.seed)] = results["classify_cam"].run_id
    variants = ablation_variants(cfg)
    scores: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        for seed in cfg.pipeline.ablation_seeds:
            seeded = v.cfg.model_copy(update={"seed": seed})
            prefix = f"ablation/{v.key}/seed{seed}"
            tags = {tracking.ROLE_TAG: tracking.ABLATION, ABLATION_TAG: v.key, "mcis.seed": str(seed)}
            key = (seeded.classify.model_dump_json(), seed)
            if key not in trained:
                trained[key] = step(f"{prefix}/classify", lambda p, c=seeded: classify.run(c, parent=p),
                                    **tags).run_id
            maps = step(f"{prefix}/localize",
                        lambda p, c=seeded, k=key: localize.run(c, from_run=trained[k], parent=p), **tags)
            pseudo = step(f"{prefix}/pseudolabel",
                          lambda p, c=seeded, m=maps: pseudolabel.run(c, from_run=m.run_id, parent=p), **tags)
            per = scores.setdefault(v.name, {"maps": [], "pseudo": []})
            per["maps"].append(maps.metrics["maps/miou"])
            per["pseudo"].append(pseudo.metrics["pseudo/miou"])
    table = ablation_table(scores, len(cfg.pipeline.ablation_seeds))
    step.job.report(lambda log: _log_ablation(log, variants, scores, table))
    return table


def _log_ablation(log: tracking.Tracker, variants: list[Variant], scores: dict, table: Table) -> None:
    for v in variants:
        for what, values in scores[v.name].items():
            log.log_metrics({f"ablation/{v.key}/{what}_miou_mean": float(np.mean(values)),
                             f"ablation/{v.key}/{what}_miou_std": float(np.std(values))}, step=0)
    log.log_text(reporting.markdown(table), "ablation.md")
    log.log_figure(reporting.ablation_chart(scores), "ablation.png")


def ablation_table(scores: dict[str, dict[str, list[float]]], seeds: int) -> Table:
    """Mean ± std over seeds per variant, and each mean's difference to the first (plain CAM)."""
    first = next(iter(scores.values()))
    rows = []
    for name, per in scores.items():
        cells = [name]
        for what in ("maps", "pseudo"):
            values = np.asarray(per[what])
            cells += [f"{values.mean():.4f} ± {values.std():.4f}", f"{values.mean() - np.mean(first[what]):+.4f}"]
        rows.append(cells)
    return reporting.table(("variant", "maps", "maps vs CAM", "pseudo masks", "pseudo vs CAM"), rows,
                           title=f"Ablation: mIoU on the training images, mean ± std over {seeds} seeds")
