"""How good a stage's output is against the ground truth, in one place for every stage that says.

Scoring goes in two steps so that it can run over sharded, resumable work: a per-image record
(confusion matrices, hot-region counts) made where the image is processed, and a score made from
the records' sum. `localize` and `evaluate` score maps with the same sweep and the same
best-threshold rule; `pseudolabel` and `evaluate` score masks with the same `mask_scores`.
Ground-truth masks are read by the callers of this module only for these reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mcis_cli import metrics


def maps_record(maps: np.ndarray, classes: Sequence[int], mask: np.ndarray, parts: np.ndarray | None,
                thresholds: Sequence[float], num_classes: int) -> dict[str, np.ndarray]:
    """One image's maps against its mask: a (T, C, C) confusion matrix per background threshold
    and, with a part map, where the maps' hot regions fall."""
    record = {"sweep": metrics.threshold_sweep(maps, classes, mask, thresholds, num_classes)}
    if parts is not None:
        record["hot"] = metrics.hot_region_counts(maps, classes, mask, parts)
    return record


def best_threshold(mious: Sequence[float]) -> int:
    """The sweep's best point: the highest mIoU, the lowest threshold on a tie; a point without a
    score (NaN: nothing to score there) is passed over, and a sweep with none gives the first."""
    values = np.asarray(mious, np.float64)
    return 0 if np.isnan(values).all() else int(np.nanargmax(values))


def maps_scores(sweep: np.ndarray, hot: np.ndarray | None, names: Sequence[str],
                thresholds: Sequence[float]) -> dict:
    """The summed records of a set of images: the curve of scores over the thresholds, the best
    point, its confusion matrix, and the hot-region shares (empty without part maps)."""
    curve = [metrics.scores(cm, names) for cm in sweep]
    best = best_threshold([s["miou"] for s in curve])
    return {"curve": curve, "best": best, "threshold": thresholds[best], "cm": sweep[best],
            "hot": metrics.hot_region_scores(hot) if hot is not None and hot[0] else {}}


def mask_scores(cm: np.ndarray, names: Sequence[str]) -> tuple[dict, dict[str, float]]:
    """`metrics.scores` of masks' confusion matrix, and the class means of their precision and
    recall (a class never seen, NaN, left out; a mean of none is not given)."""
    result = metrics.scores(cm, names)
    means = {}
    for name in ("precision", "recall"):
        values = [v for v in result[name].values() if not np.isnan(v)]
        if values:
            means[name] = float(np.mean(values))
    return result, means


def saliency_scores(fmeasures: Iterable[float], maes: Iterable[float], overlaps: np.ndarray) -> dict[str, float]:
    """A saliency cue over a set of images: mean F-measure and MAE per image, and the IoU of its
    foreground with the objects' pixels, pooled (as the masks use it)."""
    inter, union = overlaps
    return {"saliency/fmeasure": float(np.mean(list(fmeasures))), "saliency/mae": float(np.mean(list(maes))),
            "saliency/fg_iou": float(inter / max(union, 1))}
