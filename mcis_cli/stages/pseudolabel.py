"""`mcis pseudolabel`: pseudo masks from the localization maps and a background cue (§3).

Background "saliency" is the official gen_gt.py: the background score is 1 - saliency, the class
scores are the min-max normalised maps, and uncertain pixels become 255 (ignored by the segmentation
loss). Each rule is one small function below, in the order gen_gt.py applies them. Background "cam"
needs no saliency: the background score is (1 - max map) ** power and a class needs its map above a
threshold, as PSA / IRN build their seeds.

Ground-truth masks, where the dataset has them, are read only for the separately named quality
report (`pseudo/*`, `saliency/*` metrics); the masks written never depend on them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcis_cli import artifacts, metrics, reporting, runtime, saliency, tracking
from mcis_cli.artifacts import load_maps, map_file, mask_file
from mcis_cli.config import Config, PseudolabelCfg
from mcis_cli.data import transforms, voc
from mcis_cli.data.transforms import IGNORE
from mcis_cli.errors import McisError
from mcis_cli.progress import work_progress
from mcis_cli.stages import StageResult

OVERLAYS = 8


# ---- the rules of gen_gt.py (§3), each on a whole image ----------------------------------------
def normalise(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each class map to [0, 1] (step 1); a flat map becomes 0."""
    maps = maps.astype(np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 1e-12, (maps - low) / np.maximum(span, 1e-12), 0).astype(np.float32)


def saliency_planes(maps: np.ndarray, sal: np.ndarray) -> np.ndarray:
    """Score planes (1 + n, H, W): background 1 - saliency, then the normalised class maps (step 1)."""
    return np.concatenate([(1 - sal)[None], maps]).astype(np.float32)


def saliency_attention(sal: np.ndarray, maps: np.ndarray, att_thr: float) -> np.ndarray:
    """`sal_att`: saliency raised to 1 wherever some class map exceeds att_thr (step 2)."""
    if len(maps) == 0:
        return sal
    return np.maximum(sal, (maps > att_thr).any(0).astype(np.float32))


def suppress(planes: np.ndarray, fg_thr: float) -> np.ndarray:
    """Scores below fg_thr become 0, background plane included (step 3)."""
    return np.where(planes < fg_thr, 0, planes).astype(np.float32)


def conflicts(planes: np.ndarray, conflict: float) -> np.ndarray:
    """Pixels where more than one plane exceeds `conflict` (step 4): too ambiguous to label."""
    return (planes > conflict).sum(0) > 1


def assign(planes: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Argmax over [background, classes] -> 0 or class id + 1; an all-zero pixel is background (step 5)."""
    ids = np.concatenate([[0], np.asarray(classes, np.int64) + 1])
    return ids[planes.argmax(0)].astype(np.uint8)


def ignore_salient_background(labels: np.ndarray, sal_att: np.ndarray, bg_thr: float) -> np.ndarray:
    """Background pixels that are salient (sal_att >= bg_thr, in [0, 1]) become 255 (step 6)."""
    return np.where((labels == 0) & (sal_att >= bg_thr), IGNORE, labels).astype(np.uint8)


def require_foreground(labels: np.ndarray, min_fg: float) -> np.ndarray:
    """A mask with less than min_fg of its pixels in a class is wholly ignored (step 7)."""
    fg = ((labels > 0) & (labels != IGNORE)).mean()
    return np.full_like(labels, IGNORE) if fg < min_fg else labels


def saliency_labels(maps: np.ndarray, classes: Sequence[int], sal: np.ndarray, p: PseudolabelCfg,
                    fg_thr: float | None = None) -> np.ndarray:
    """§3 steps 1-7 on one image: maps (n, H, W), saliency (H, W) in [0, 1]."""
    maps = normalise(maps)
    sal_att = saliency_attention(sal, maps, p.att_thr)
    planes = suppress(saliency_planes(maps, sal), p.fg_thr if fg_thr is None else fg_thr)
    labels = assign(planes, classes)
    labels[conflicts(planes, p.conflict)] = IGNORE
    labels = ignore_salient_background(labels, sal_att, p.bg_thr / 255)
    return require_foreground(labels, p.min_fg)


def cam_labels(maps: np.ndarray, classes: Sequence[int], p: PseudolabelCfg,
               threshold: float | None = None) -> np.ndarray:
    """No saliency: background (1 - max map) ** power; a class needs its map above the threshold."""
    maps = normalise(maps)
    threshold = p.cam_threshold if threshold is None else threshold
    top = maps.max(0) if len(maps) else np.zeros(maps.shape[1:], np.float32)
    planes = np.concatenate([((1 - top) ** p.cam_bg_power)[None], np.where(maps > threshold, maps, 0)])
    return require_foreground(assign(planes, classes), p.min_fg)


def make_labels(maps, classes, sal, p: PseudolabelCfg, threshold: float | None = None) -> np.ndarray:
    """The configured background rule; `threshold` replaces fg_thr (saliency) or cam_threshold (cam)."""
    if p.background == "cam":
        return cam_labels(maps, classes, p, threshold)
    return saliency_labels(maps, classes, sal, p, threshold)


# ---- inputs ----------------------------------------------------------------------------------
def load_saliency(cfg: Config, sample: voc.Sample, image: np.ndarray) -> np.ndarray:
    """Saliency in [0, 1] at the image size: the dataset's PNG (0..255) or computed from the
    image, then binarised and filled if configured."""
    p = cfg.pseudolabel
    if p.saliency == "computed":
        sal = saliency.saliency(image)
    else:
        path = voc.saliency_path(cfg.data.root, cfg.data.saliency_dir, sample.id)
        if not path.is_file():
            raise McisError(f"saliency map not found: {path} (provide data.saliency_dir maps for every "
                            f"training image, or --set pseudolabel.saliency=computed)")
        sal = transforms.load_image(path).astype(np.float32).mean(axis=2) / 255  # any PNG mode
        sal = transforms.resize(sal, image.shape[:2])
    if p.binarize == "none":
        return sal
    sal = saliency.binarize(sal)
    return saliency.fill(sal, p.fill_radius) if p.fill_radius else sal


@dataclass
class Outcome:
    """What one image contributes to the report."""

    ignored: int  # pixels of the written mask marked 255
    sweep_ignored: np.ndarray  # (T,) the same per sweep threshold
    pixels: int
    cm: np.ndarray | None = None  # (C, C) of the written mask, when a ground truth exists
    sweep: np.ndarray | None = None  # (T, C, C)
    fmeasure: float | None = None
    mae: float | None = None
    overlap: tuple[int, int] = (0, 0)  # saliency foreground vs object pixels: intersection, union


def _process(cfg: Config, sample: voc.Sample, maps_dir: Path, out_dir: Path, num_classes: int) -> Outcome:
    p = cfg.pseudolabel
    path = map_file(maps_dir, sample.id)
    if not path.is_file():
        raise McisError(f"the localize run has no map for {sample.id} ({path}); localize this dataset again")
    maps, classes = load_maps(path)
    maps = maps.astype(np.float32)
    image = transforms.load_image(sample.image) if p.background == "saliency" else None
    sal = load_saliency(cfg, sample, image) if image is not None else None
    labels = make_labels(maps, classes, sal, p)
    transforms.save_palette_png(mask_file(out_dir, sample.id), labels)
    sweep = [make_labels(maps, classes, sal, p, t) for t in p.sweep]
    outcome = Outcome(int((labels == IGNORE).sum()),
                      np.array([(s == IGNORE).sum() for s in sweep], np.int64), labels.size)
    if voc.mask_path(cfg.data.root, sample.id).is_file():
        gt = voc.load_mask(cfg.data.root, sample.id)
        if gt.shape != labels.shape:
            raise McisError(f"mask of {sample.id} is {gt.shape} but its image is {labels.shape}")
        outcome.cm, *swept = [metrics.confusion_matrix(pred, gt, num_classes, ignore_pred=True)
                              for pred in [labels, *sweep]]
        outcome.sweep = np.stack(swept) if swept else None
        if sal is not None:
            valid = gt != IGNORE
            fg = (gt > 0) & valid
            outcome.fmeasure = saliency.fmeasure(sal, fg, valid=valid)
            outcome.mae = saliency.mae(sal[valid], fg[valid])
            salient = (sal > 0.5) & valid
            outcome.overlap = (int((salient & fg).sum()), int((salient | fg).sum()))
    return outcome


def run(cfg: Config, from_run: str | None = None, parent: tracking.Nest | None = None) -> StageResult:
    """Under torchrun each rank writes the masks of its share of the images; the counts are
    summed and the per-image saliency scores gathered in image order, so rank 0 logs the
    numbers of a single process."""
    p = cfg.pseudolabel
    if p.background == "saliency" and p.saliency == "folder" and not cfg.data.saliency_dir:
        raise McisError("pseudolabel.saliency=folder needs data.saliency_dir (a folder of <id>.png "
                        "saliency maps); set it, or use --set pseudolabel.saliency=computed")
    runtime.init_distributed(cfg.device)
    source = tracking.resolve_run(cfg, "localize", from_run)
    maps_dir = runtime.rank_zero_first(lambda: source.fetch(artifacts.MAPS))
    samples = voc.train_samples(cfg.data)
    names = ["background", *voc.class_names(cfg.data.root)]

    with runtime.open_run(cfg, "pseudolabel", source=source, parent=parent) as (tracker, run_id):
        out_dir = tracking.workdir(cfg, run_id) / artifacts.PSEUDO
        total_cm = np.zeros((len(names), len(names)), np.int64)
        sweep_cm = np.zeros((len(p.sweep), len(names), len(names)), np.int64)
        ignored, sweep_ignored, pixels = 0, np.zeros(len(p.sweep), np.int64), 0
        sal_scores: list[tuple[int, float, float, int, int]] = []
        any_gt = 0
        mine = runtime.shard(list(enumerate(samples)), [1 + len(s.labels) for s in samples])
        workers = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        with work_progress() as progress, ThreadPoolExecutor(workers) as pool:
            progress.disable = tracker is None
            task = progress.add_task("pseudolabel", total=len(mine))
            jobs = pool.map(lambda job: (job[0], _process(cfg, job[1], maps_dir, out_dir, len(names))), mine)
            for index, outcome in jobs:
                ignored += outcome.ignored
                sweep_ignored += outcome.sweep_ignored
                pixels += outcome.pixels
                if outcome.cm is not None:
                    any_gt = 1
                    total_cm += outcome.cm
                    if outcome.sweep is not None:
                        sweep_cm += outcome.sweep
                if outcome.fmeasure is not None:
                    sal_scores.append((index, outcome.fmeasure, outcome.mae, *outcome.overlap))
                progress.advance(task)
        runtime.settle("pseudolabel")
        ignored, pixels, any_gt = runtime.all_sum(np.array([ignored, pixels, any_gt]))
        sweep_ignored, total_cm, sweep_cm = map(runtime.all_sum, (sweep_ignored, total_cm, sweep_cm))
        sal_scores = sorted(runtime.gather(sal_scores))  # image order: the means of one process

        result = {"pseudo/images": float(len(samples)), "pseudo/ignore_frac": ignored / max(pixels, 1)}
        if any_gt:
            scores = metrics.scores(total_cm, names)
            result.update(metrics.mlflow_metrics(scores, prefix="pseudo/"))
            for name in ("precision", "recall"):  # class means; NaN (class never seen) left out
                values = [v for v in scores[name].values() if not np.isnan(v)]
                if values:
                    result[f"pseudo/{name}"] = float(np.mean(values))
        if sal_scores:
            _, fmeasure, mae, inter, union = np.array(sal_scores, np.float64).T
            result["saliency/fmeasure"] = float(fmeasure.mean())
            result["saliency/mae"] = float(mae.mean())
            result["saliency/fg_iou"] = float(inter.sum() / max(union.sum(), 1))  # as the masks use it
        ignore_curve = (sweep_ignored / max(pixels, 1)).tolist()
        miou_curve = [metrics.scores(cm, names)["miou"] for cm in sweep_cm] if any_gt else [np.nan] * len(p.sweep)
        if tracker:
            _report(tracker, cfg, samples, out_dir, names, total_cm if any_gt else None, result,
                    ignore_curve, miou_curve)
    headline = {k: result[k] for k in ("pseudo/miou", "pseudo/precision", "pseudo/recall", "pseudo/ignore_frac",
                                       "saliency/fmeasure", "saliency/fg_iou") if k in result}
    return StageResult(run_id, headline, {artifacts.PSEUDO: str(out_dir)})


def _report(tracker: tracking.Tracker, cfg: Config, samples: Sequence[voc.Sample], out_dir: Path,
            names: Sequence[str], cm: np.ndarray | None, result: dict[str, float],
            ignore_curve: list[float], miou_curve: list[float]) -> None:
    """Rank 0's logging: the confusion matrix, the sweep, the metrics, every rank's masks."""
    p = cfg.pseudolabel
    if cm is not None:
        tracker.log_text(reporting.confusion_csv(cm, names), "pseudo_confusion.csv")
    if p.sweep:
        for step, (t, m, ig) in enumerate(zip(p.sweep, miou_curve, ignore_curve, strict=True)):
            point = {"sweep/threshold": t, "sweep/ignore_frac": ig}
            if not np.isnan(m):  # NaN: no ground truth, or every pixel ignored
                point["sweep/miou"] = m
            tracker.log_metrics(point, step=step)
        curves = {"mIoU (ignored pixels excluded)": miou_curve, "ignored share": ignore_curve}
        xlabel = "cam_threshold" if p.background == "cam" else "fg_thr"
        tracker.log_figure(reporting.sweep_figure(p.sweep, curves, xlabel), "pseudo_sweep.png")
    tracker.log_metrics(result)
    tracker.log_artifacts(out_dir, artifacts.PSEUDO)
    tracker.log_image(_overlays(cfg, samples[:OVERLAYS], out_dir), "pseudo_overlays")


def _overlays(cfg: Config, samples: Sequence[voc.Sample], out_dir: Path) -> np.ndarray:
    """image | background cue | pseudo mask | ground truth (when there is one), one row an image."""
    rows = []
    for sample in samples:
        image = transforms.load_image(sample.image)
        row = [image]
        if cfg.pseudolabel.background == "saliency":
            row.append(reporting.heat_overlay(image, load_saliency(cfg, sample, image)))
        row.append(transforms.read_index_png(mask_file(out_dir, sample.id)))
        if voc.mask_path(cfg.data.root, sample.id).is_file():
            row.append(voc.load_mask(cfg.data.root, sample.id))
        rows.append(row)
    return reporting.overlay_grid(rows)
