"""`mcis evaluate`: score any stage's output against the ground-truth masks, in its own run.

- a segment run: its model, multi-scale + flip, then the dense CRF; both the plain and the CRF
  scores are logged (`miou` is the final one, `miou_nocrf` the other), since the CRF does not
  always help;
- a pseudolabel run: its masks, over the pixels they label (255 = ignore is left out, not
  counted as wrong), plus the fraction they leave unlabelled;
- a localize run (or another run of maps: artifacts.MAP_STAGES): its maps, over a sweep of background thresholds; `miou` is the best one.

Runs are tagged with what was scored and where (mcis.scored_stage, mcis.split, mcis.crf), so a
train pseudo-label mIoU is never taken for a val segmentation mIoU.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcis_cli import artifacts, engine, metrics, quality, reporting, tracking
from mcis_cli.artifacts import load_maps, map_file, mask_file
from mcis_cli.config import Config
from mcis_cli.crf import crf_map
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path
from mcis_cli.progress import out
from mcis_cli.stages import StageResult
from mcis_cli.tta import predict_probs

STAGES = ("segment", "pseudolabel", *artifacts.MAP_STAGES)


@dataclass
class Scored:
    """What a scorer measured: the final confusion matrix and what is particular to the stage."""

    cm: np.ndarray
    note: str  # what was measured, for results.md
    headline: dict[str, float] = field(default_factory=dict)  # returned and tabulated
    extra: dict[str, float] = field(default_factory=dict)  # logged only
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (threshold, miou)


def overlay_ids(samples: Sequence[voc.Sample], count: int) -> set[str]:
    """`count` samples spread evenly over the split: the same ones on every run."""
    if count <= 0 or not samples:
        return set()
    picks = np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)
    return {samples[i].id for i in picks}


def _require(paths: Iterable[Path], what: str, hint: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise McisError(f"{len(missing)} images have no {what} (first: {missing[0]}); {hint}")


def _pixels(sample: voc.Sample) -> int:
    """An image's pixel count from its header: what scoring it costs."""
    from PIL import Image

    with Image.open(sample.image) as image:
        return image.width * image.height


def _tally(job: engine.Job, label: str, samples: Sequence[voc.Sample], pairs, num_classes: int,
           shown: set[str], masks_dir: Path | None, ignore_pred: bool = False) -> tuple:
    """Confusion matrix of the (sample, gt, pred, extra record) that `pairs(samples)` yields, with
    the masks written when asked. Returns (cm, overlays of the `shown` images, fraction of pixels
    predicted 255), and the sum of the `plain` matrices that `pairs` may give as its extra record."""
    def process(todo: list[voc.Sample]):
        for sample, gt, pred, extra in pairs(todo):
            record = {"cm": metrics.confusion_matrix(pred, gt, num_classes, ignore_pred=ignore_pred),
                      "ignored": int((pred == transforms.IGNORE).sum()), "pixels": pred.size, **extra}
            if sample.id in shown:
                record["pred"] = pred
            if masks_dir is not None:
                transforms.save_palette_png(masks_dir / f"{sample.id}.png", pred)
            yield sample, record

    records = job.map(label, samples, process, key=lambda s: s.id, weight=_pixels)
    overlays = [(transforms.load_image(s.image), voc.load_mask(job.cfg.data.root, s.id), records.get(s.id)["pred"])
                for s in samples if s.id in shown]
    cm, ignored, pixels, plain = records.summed("cm", "ignored", "pixels", "plain")
    if cm is None:  # no image to score
        cm, ignored, pixels = np.zeros((num_classes, num_classes), np.int64), 0, 0
    return cm, overlays, int(ignored) / max(int(pixels), 1), plain


# ---- the three scorers -------------------------------------------------------------------
def _score_segment(job: engine.Job, model, meta: dict, samples, names, shown, masks_dir) -> Scored:
    """Multi-scale + flip inference, then (optionally) the CRF in worker processes; the CRF runs
    on images already predicted while the next ones go through the network."""
    cfg = job.cfg
    ev, root, k = cfg.evaluate, cfg.data.root, len(names)
    model.to(job.device).eval()
    waiting: deque = deque()

    def predictions(share):
        for sample in share:
            image = transforms.load_image(sample.image)
            gt = voc.load_mask(root, sample.id)
            probs = predict_probs(model, image, ev.scales, ev.flip, ev.window, job.device,
                                  meta.get("mean", transforms.IMAGENET_MEAN),
                                  meta.get("std", transforms.IMAGENET_STD), ev.upsample)
            pred = probs.argmax(0).astype(np.uint8)
            waiting.append((sample, gt, pred, {"plain": metrics.confusion_matrix(pred, gt, k)}))
            yield image, probs

    def pairs(share):
        if ev.crf:
            refined = crf_map(predictions(share), ev.crf_params, ev.jobs, argmax=True)
            for pred in refined:
                sample, gt, _, extra = waiting.popleft()
                yield sample, gt, pred, extra
        else:
            for _ in predictions(share):
                yield waiting.popleft()

    cm, overlays, _, plain = _tally(job, "evaluate", samples, pairs, k, shown, masks_dir)
    note = (f"Model predictions: scales {ev.scales}, flip {ev.flip}, window {ev.window or 'none'}, "
            f"{ev.upsample} upsampling"
            + (f", dense CRF {ev.crf_params.model_dump()}." if ev.crf else ", no CRF."))
    if not ev.crf:
        return Scored(cm, note, overlays=overlays)
    before = metrics.scores(plain, names)
    after = metrics.scores(cm, names)["miou"]
    return Scored(
        cm,
        note,
        headline={"miou_nocrf": before["miou"], "crf_gain": after - before["miou"]},
        extra=metrics.mlflow_metrics(before, prefix="nocrf/"),
        overlays=overlays,
    )


def _score_pseudo(job: engine.Job, folder: Path, samples, names, shown, masks_dir) -> Scored:
    root = job.cfg.data.root

    def pairs(share):
        for s in share:
            yield s, voc.load_mask(root, s.id), transforms.read_index_png(mask_file(folder, s.id)), {}

    cm, overlays, ignored, _ = _tally(job, "evaluate", samples, pairs, len(names), shown, masks_dir,
                                      ignore_pred=True)
    note = ("Pseudo masks scored over the pixels they label: 255 (ignore) is left out, not "
            "counted as wrong; ignore_fraction is the share of pixels left unlabelled.")
    return Scored(cm, note, headline={"ignore_fraction": ignored}, overlays=overlays)


def _score_maps(job: engine.Job, folder: Path, samples, names, shown, masks_dir) -> Scored:
    """Background-threshold sweep; overlays and masks come from a second pass at the best one."""
    root, k, thresholds = job.cfg.data.root, len(names), job.cfg.quality.bg_sweep

    def sweep(share):
        for sample in share:
            maps, classes = load_maps(map_file(folder, sample.id))
            yield sample, quality.maps_record(maps, classes, voc.load_mask(root, sample.id), None, thresholds, k)

    records = job.map("sweep", samples, sweep, key=lambda s: s.id)
    scored = quality.maps_scores(records.summed("sweep")[0], None, names, thresholds)
    threshold = scored["threshold"]

    def at_best(share):
        for sample in share:
            maps, classes = load_maps(map_file(folder, sample.id))
            yield sample, voc.load_mask(root, sample.id), metrics.labels_from_maps(maps, classes, threshold), {}

    again = samples if masks_dir is not None else [s for s in samples if s.id in shown]
    _, overlays, _, _ = _tally(job, "best", again, at_best, k, shown, masks_dir)
    note = ("Localization maps: label = argmax over [background threshold, maps]; the scores "
            f"are those of the best of {len(thresholds)} thresholds.")
    mious = [s["miou"] for s in scored["curve"]]
    return Scored(scored["cm"], note, headline={"best_threshold": threshold}, overlays=overlays,
                  curve=list(zip(thresholds, mious, strict=True)))


# ---- reporting ---------------------------------------------------------------------------
def ceiling_miou(cfg: Config, split: str, crf: bool) -> float | None:
    """mIoU of the newest fully supervised model (segment --labels gt) on `split`, preferring an
    evaluate run with the same CRF setting, else that segment run's own validation mIoU."""
    for run in tracking.find_runs(cfg, "segment", **{tracking.LABELS_TAG: "gt"}):
        scored = tracking.find_runs(cfg, "evaluate", **{tracking.SOURCE_TAG: run.run_id, "mcis.split": split})
        same = [r for r in scored if r.tags.get("mcis.crf") == str(crf).lower()]
        for r in same or scored:
            if "miou" in r.metrics:
                return r.metrics["miou"]
        if split == cfg.data.val_list and "val/miou" in run.metrics:
            return run.metrics["val/miou"]
    return None


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def class_table(result: dict):
    """IoU, precision and recall per class, in %."""
    return reporting.table(("class", "IoU %", "precision %", "recall %"), (
        (name, _pct(iou), _pct(result["precision"][name]), _pct(result["recall"][name]))
        for name, iou in result["iou"].items()))


def results_markdown(title: str, note: str, summary: dict[str, float], result: dict, curve) -> str:
    parts = [f"# {title}\n\n{note}\n",
             reporting.markdown(reporting.table(("metric", "value"), ((k, f"{v:.4f}") for k, v in summary.items()))),
             reporting.markdown(class_table(result))]
    if curve:
        parts.append(reporting.markdown(reporting.table(("background threshold", "mIoU %"),
                                                        ((f"{t:.2f}", _pct(m)) for t, m in curve))))
    return "\n".join(parts)


def _print_table(title: str, summary: dict[str, float], result: dict) -> None:
    table = class_table(result)
    table.add_section()
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}", "", "")
    out.print(title, style="bold", highlight=False, soft_wrap=True)  # a rich title would wrap to the table
    out.print(table)


def _json_safe(result: dict) -> dict:
    fix = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {k: {c: fix(x) for c, x in v.items()} if isinstance(v, dict) else fix(v) for k, v in result.items()}


# ---- the stage ---------------------------------------------------------------------------
def _inputs(cfg: Config, source: tracking.SourceRun, samples, names) -> tuple:
    """What the scorer of the source's stage reads: the model and its metadata, or the folder
    of pseudo masks / maps, which must hold a file for every image of the split."""
    if source.stage == "segment":
        model, meta = artifacts.load_segmenter(source.fetch(artifacts.MODEL))
        if list(meta.get("class_names", names)) != names:
            raise McisError(f"run {source.run_id} was trained on classes {meta['class_names']} but "
                            f"{cfg.data.root} has {names}; evaluate it on its own dataset")
        return model, meta
    artifact, file = (artifacts.PSEUDO, mask_file) if source.stage == "pseudolabel" else (artifacts.MAPS, map_file)
    folder = source.fetch(artifact)
    _require((file(folder, s.id) for s in samples), f"{artifact} file in run {source.run_id}",
             f"score the split it covered (--split {cfg.data.train_list})")
    return (folder,)


def _memory(cfg: Config) -> tuple[str, str]:
    ev = cfg.evaluate
    windows = f"{ev.window} px windows" if ev.window else "whole images"
    return f"{windows} at scales up to {max(ev.scales)}", "evaluate.window or the largest evaluate.scales"


STAGE = engine.Stage("evaluate", reads=("segment",), sections=("evaluate", "quality"), memory=_memory)
SCORERS = {"segment": _score_segment, "pseudolabel": _score_pseudo} | dict.fromkeys(artifacts.MAP_STAGES, _score_maps)


@STAGE
def run(cfg: Config, from_run: str | None = None, split: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Score the given run (default: the method's newest finished segment run) on `split` (default: the
    val list for a model, the train list for maps and pseudo masks)."""
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent,
                       reads=STAGES if from_run or resume else None, extra={"split": split})
    source, root = job.source, cfg.data.root
    stage = source.stage
    split = split or (cfg.data.val_list if stage == "segment" else cfg.data.train_list)
    names = ["background", *voc.class_names(root)]
    samples = voc.split_samples(root, split)
    if not samples:
        raise McisError(f"split {split!r} of {root} lists no images")
    _require((voc.mask_path(root, s.id) for s in samples), "ground-truth mask",
             f"evaluation needs {voc.MASKS}/ for every image of split {split!r}")
    inputs = job.first(lambda: _inputs(cfg, source, samples, names))  # before the run: bad input opens none
    crf = cfg.evaluate.crf and stage == "segment"

    with job.open(tags={"mcis.scored_stage": stage, "mcis.split": split, "mcis.crf": str(crf).lower()}):
        masks_dir = job.folder / "masks" if cfg.evaluate.save_masks else None
        scored = SCORERS[stage](job, *inputs, samples, names, overlay_ids(samples, cfg.evaluate.overlays),
                                masks_dir)
        result = metrics.scores(scored.cm, names)
        summary = {k: result[k] for k in ("miou", "pixel_acc", "mean_acc", "fw_iou")} | scored.headline
        if stage == "segment" and source.role != tracking.CEILING:
            summary |= job.report(lambda log: ceiling_scores(cfg, split, crf, result["miou"])) or {}
        title = f"{stage} run {source.run_id} on {split}" + (" + CRF" if crf else "")
        job.report(lambda log: _report(log, job.folder, title, scored, summary, result, names, masks_dir))
    outputs = {"results": str(job.folder / "results.md")} | ({"masks": str(masks_dir)} if masks_dir else {})
    return job.result(summary, outputs)


def ceiling_scores(cfg: Config, split: str, crf: bool, miou: float) -> dict[str, float]:
    """The fully supervised ceiling's mIoU and the fraction of it reached, when there is one."""
    ceiling = ceiling_miou(cfg, split, crf)
    return {"ceiling_miou": ceiling, "ceiling_fraction": miou / ceiling} if ceiling else {}


def _report(log: tracking.Tracker, folder: Path, title: str, scored: Scored, summary: dict[str, float],
            result: dict, names: Sequence[str], masks_dir: Path | None) -> None:
    """The scores, the confusion matrix, the plots, results.md and the masks; the table printed."""
    log.log_metrics(metrics.mlflow_metrics(result) | summary | scored.extra)
    for threshold, miou in scored.curve:
        log.log_metrics({"sweep/miou": miou}, step=round(threshold * 100))
    with atomic_path(folder / "confusion.csv") as tmp:
        tmp.write_text(reporting.confusion_csv(scored.cm, names))
    log.log_artifact(folder / "confusion.csv")
    log.log_dict(_json_safe(result), "scores.json")
    log.log_figure(reporting.confusion_figure(scored.cm, names), "plots/confusion.png")
    log.log_figure(reporting.iou_figure(result["iou"], result["miou"]), "plots/iou.png")
    if scored.curve:
        thresholds, mious = zip(*scored.curve, strict=True)
        log.log_figure(reporting.sweep_figure(thresholds, {"mIoU": mious}, "background threshold",
                                              summary["best_threshold"]), "plots/sweep.png")
    if scored.overlays:
        log.log_figure(reporting.overlay_figure(scored.overlays, names), "plots/overlays.png")
    report = folder / "results.md"
    with atomic_path(report) as tmp:
        tmp.write_text(results_markdown(title, scored.note, summary, result, scored.curve))
    log.log_artifact(report)
    if masks_dir is not None:
        log.log_artifacts(masks_dir, "masks")
    _print_table(title, summary, result)
