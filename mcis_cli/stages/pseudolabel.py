"""`mcis pseudolabel`: pseudo masks from the localization maps and a background cue (docs/method.md §3).

Background "saliency" is the official gen_gt.py: the background score is 1 - saliency, the class
scores are the min-max normalised maps, and uncertain pixels become 255 (ignored by the segmentation
loss). Each rule is one small function below, in the order gen_gt.py applies them. Background "cam"
needs no saliency: the background score is (1 - max map) ** power and a class needs its map above a
threshold, as PSA / IRN build their seeds.

Ground-truth masks, where the dataset has them, are read only for the separately named quality
report (`pseudo/*`, `saliency/*` metrics); the masks written never depend on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mcis_cli import artifacts, engine, metrics, quality, reporting, saliency, tracking
from mcis_cli.artifacts import load_maps, map_file, mask_file
from mcis_cli.config import Config, PseudolabelCfg
from mcis_cli.data import transforms, voc
from mcis_cli.data.transforms import IGNORE
from mcis_cli.errors import McisError
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


def walk_labels(maps: np.ndarray, classes: Sequence[int], background: np.ndarray) -> np.ndarray:
    """PSA's rule (infer_aff.py:117-122): the argmax over the walked background and class maps,
    no saliency, no threshold, nothing ignored."""
    return assign(np.concatenate([background[None], maps]).astype(np.float32), classes)


def make_labels(maps, classes, sal, p: PseudolabelCfg, threshold: float | None = None,
                background: np.ndarray | None = None) -> np.ndarray:
    """The configured background rule; `threshold` replaces fg_thr (saliency) or cam_threshold
    (cam); walk has none (its sweep repeats the one mask)."""
    if p.background == "walk":
        return walk_labels(maps, classes, background)
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


def walked_background(path: Path) -> np.ndarray:
    """The background plane of a walked maps file; the walk rule has nothing to work on without it."""
    bg = artifacts.load_background(path)
    if bg is None:
        raise McisError(f"{path} has no background plane: pseudolabel.background=walk reads the maps of "
                        "a refine run (mcis refine --from-run MAPS_RUN)")
    return bg.astype(np.float32)


def _process(cfg: Config, sample: voc.Sample, maps_dir: Path, out_dir: Path, num_classes: int) -> dict:
    """Write one image's mask; its record: the ignored pixels (of the mask and of each sweep
    point) and, where a ground truth exists, the quality report's confusion matrices and the
    saliency's scores."""
    p = cfg.pseudolabel
    path = map_file(maps_dir, sample.id)
    if not path.is_file():
        raise McisError(f"the localize run has no map for {sample.id} ({path}); localize this dataset again")
    maps, classes = load_maps(path)
    maps = maps.astype(np.float32)
    bg = walked_background(path) if p.background == "walk" else None
    image = transforms.load_image(sample.image) if p.background == "saliency" else None
    sal = load_saliency(cfg, sample, image) if image is not None else None
    labels = make_labels(maps, classes, sal, p, background=bg)
    transforms.save_palette_png(mask_file(out_dir, sample.id), labels)
    sweep = [make_labels(maps, classes, sal, p, t, bg) for t in p.sweep]
    record = {"ignored": int((labels == IGNORE).sum()), "pixels": labels.size,
              "sweep_ignored": np.array([(s == IGNORE).sum() for s in sweep], np.int64)}
    if not voc.mask_path(cfg.data.root, sample.id).is_file():
        return record
    gt = voc.load_mask(cfg.data.root, sample.id)
    if gt.shape != labels.shape:
        raise McisError(f"mask of {sample.id} is {gt.shape} but its image is {labels.shape}")
    cm, *swept = [metrics.confusion_matrix(pred, gt, num_classes, ignore_pred=True) for pred in [labels, *sweep]]
    record["cm"] = cm
    if swept:
        record["sweep"] = np.stack(swept)
    if sal is not None:
        valid = gt != IGNORE
        fg = (gt > 0) & valid
        salient = (sal > 0.5) & valid
        record |= {"fmeasure": saliency.fmeasure(sal, fg, valid=valid), "mae": saliency.mae(sal[valid], fg[valid]),
                   "overlap": np.array([(salient & fg).sum(), (salient | fg).sum()], np.int64)}
    return record


def _check(cfg: Config) -> None:
    p = cfg.pseudolabel
    if p.background == "saliency" and p.saliency == "folder" and not cfg.data.saliency_dir:
        raise McisError("pseudolabel.saliency=folder needs data.saliency_dir (a folder of <id>.png "
                        "saliency maps); set it, or use --set pseudolabel.saliency=computed")


STAGE = engine.Stage("pseudolabel", reads=artifacts.MAP_STAGES, sections=("pseudolabel",))
RULE = ("background", "att_thr", "fg_thr", "conflict", "bg_thr", "min_fg")  # logged as applied
HEADLINE = ("pseudo/miou", "pseudo/precision", "pseudo/recall", "pseudo/ignore_frac", "saliency/fmeasure",
            "saliency/fg_iou")


@STAGE
def run(cfg: Config, from_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """A mask for every training image, images in parallel threads (the rules are numpy), by the
    thresholds of the maps' method (`pseudolabel.oaa` for OAA's and OAA+'s maps)."""
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent)
    cfg = cfg.replace(pseudolabel=cfg.pseudolabel.for_method(job.source.method).model_dump())
    _check(cfg)
    p = cfg.pseudolabel
    maps_dir = job.fetch(artifacts.MAPS)
    samples = voc.train_samples(cfg.data)
    names = ["background", *voc.class_names(cfg.data.root)]

    rule = {f"rule.{k}": getattr(p, k) for k in RULE}
    with job.open(params=rule):
        out_dir = job.folder / artifacts.PSEUDO

        def process(todo: list[voc.Sample]):
            with ThreadPoolExecutor(job.cpus) as pool:
                yield from zip(todo, pool.map(lambda s: _process(cfg, s, maps_dir, out_dir, len(names)), todo),
                               strict=True)

        records = job.map("pseudolabel", samples, process, key=lambda s: s.id, weight=lambda s: 1 + len(s.labels))
        pixels, ignored, cm, sweep_ignored, swept, overlap = records.summed(
            "pixels", "ignored", "cm", "sweep_ignored", "sweep", "overlap")
        pixels = 0 if pixels is None else int(pixels)
        result = {"pseudo/images": float(len(samples)),
                  "pseudo/ignore_frac": (0 if ignored is None else int(ignored)) / max(pixels, 1)}
        if cm is not None:
            scores, means = quality.mask_scores(cm, names)
            result.update(metrics.mlflow_metrics(scores, prefix="pseudo/"))
            result.update({f"pseudo/{k}": v for k, v in means.items()})
        if overlap is not None:
            result.update(quality.saliency_scores(*records.listed("fmeasure", "mae"), overlap))
        if sweep_ignored is None:
            sweep_ignored = np.zeros(len(p.sweep), np.int64)
        ignore_curve = (sweep_ignored / max(pixels, 1)).tolist()
        miou_curve = [np.nan] * len(p.sweep) if swept is None else [metrics.scores(c, names)["miou"] for c in swept]
        job.report(lambda log: _report(log, cfg, samples, out_dir, names, cm, result, ignore_curve, miou_curve))
    return job.result({k: result[k] for k in HEADLINE if k in result}, {artifacts.PSEUDO: str(out_dir)})


def _report(log: tracking.Tracker, cfg: Config, samples: Sequence[voc.Sample], out_dir: Path,
            names: Sequence[str], cm: np.ndarray | None, result: dict[str, float],
            ignore_curve: list[float], miou_curve: list[float]) -> None:
    """The confusion matrix, the sweep, the metrics, the masks and their overlays."""
    p = cfg.pseudolabel
    if cm is not None:
        log.log_text(reporting.confusion_csv(cm, names), "pseudo_confusion.csv")
    if p.sweep:
        for step, (t, m, ig) in enumerate(zip(p.sweep, miou_curve, ignore_curve, strict=True)):
            point = {"sweep/threshold": t, "sweep/ignore_frac": ig}
            if not np.isnan(m):  # NaN: no ground truth, or every pixel ignored
                point["sweep/miou"] = m
            log.log_metrics(point, step=step)
        curves = {"mIoU (ignored pixels excluded)": miou_curve, "ignored share": ignore_curve}
        xlabel = "cam_threshold" if p.background == "cam" else "fg_thr"
        log.log_figure(reporting.sweep_figure(p.sweep, curves, xlabel), "pseudo_sweep.png")
    log.log_metrics(result)
    log.log_artifacts(out_dir, artifacts.PSEUDO)
    log.log_image(_overlays(cfg, samples[:OVERLAYS], out_dir), "pseudo_overlays")


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
