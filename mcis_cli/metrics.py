"""Segmentation scores from a confusion matrix: mIoU, per-class IoU, precision, recall.

Rows of the matrix are ground truth, columns predictions, as in scikit-learn. Pixels whose
ground truth is `ignore` never count; with `ignore_pred=True` neither do pixels the prediction
marks `ignore` (pseudo masks leave uncertain pixels unlabelled; scoring those as errors is the
mistake behind AMN#3's "37.8 instead of 70").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mcis_cli.errors import McisError


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = 255, ignore_pred: bool = False
) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise McisError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    pred = pred.ravel().astype(np.int64)
    gt = gt.ravel().astype(np.int64)
    keep = gt != ignore
    if ignore_pred:
        keep &= pred != ignore
    pred, gt = pred[keep], gt[keep]
    for name, values in (("ground truth", gt), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise McisError(
                f"{name} holds label {values.max()} outside 0..{num_classes - 1} "
                f"(wrong class list, or pass ignore_pred for 255-marked pseudo masks)"
            )
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den is 0 (a class absent from both sides has no score)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def scores(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Headline and per-class scores; classes absent from both truth and prediction are NaN
    and left out of every mean."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    tp = np.diag(cm)
    gt_total = cm.sum(1)
    pred_total = cm.sum(0)
    total = cm.sum()
    iou = _ratio(tp, gt_total + pred_total - tp)
    precision = _ratio(tp, pred_total)
    recall = _ratio(tp, gt_total)
    freq = gt_total / total if total else np.zeros_like(gt_total)
    present = ~np.isnan(iou)
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        "mean_acc": float(np.nanmean(recall)) if (gt_total > 0).any() else float("nan"),
        "fw_iou": float((freq[present] * iou[present]).sum()),
        "iou": dict(zip(class_names, iou.tolist(), strict=True)),
        "precision": dict(zip(class_names, precision.tolist(), strict=True)),
        "recall": dict(zip(class_names, recall.tolist(), strict=True)),
    }


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, `_-. /`; anything else in a class name becomes `_`."""
    return re.sub(r"[^\w\-. /]", "_", name)


def mlflow_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Flat `miou`, `iou/<class>`, `precision/<class>`, `recall/<class>`, ...; NaN left out."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update({f"{prefix}{key}/{metric_key(c)}": v for c, v in value.items()})
        else:
            flat[f"{prefix}{key}"] = value
    return {k: float(v) for k, v in flat.items() if not np.isnan(v)}


def labels_from_maps(maps: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """Label map from per-class localization maps: argmax over [threshold, maps] (0 = background,
    class c -> c + 1). Ties go to the background, as np.argmax would pick index 0."""
    if len(classes) == 0:
        return np.zeros(maps.shape[-2:], np.uint8)
    ids = np.asarray(classes, np.int64) + 1
    maps = np.asarray(maps, np.float32)
    best = maps.max(0)
    return np.where(best > threshold, ids[maps.argmax(0)], 0).astype(np.uint8)


def threshold_sweep(
    maps: np.ndarray, classes: Sequence[int], gt: np.ndarray, thresholds: Sequence[float],
    num_classes: int,
) -> np.ndarray:
    """(T, C, C) confusion matrices of one image's maps, one per background threshold."""
    top = labels_from_maps(maps, classes, -np.inf)  # every pixel given its best class
    best = np.asarray(maps, np.float32).max(0) if len(classes) else np.zeros(gt.shape, np.float32)
    return np.stack([
        confusion_matrix(np.where(best > t, top, 0), gt, num_classes) for t in thresholds
    ])


HOT = 0.5  # a map's hot region: where it reaches half its own peak


def hot_region_counts(maps: np.ndarray, classes: Sequence[int], mask: np.ndarray, parts: np.ndarray,
                      part: int = 2, body: int = 1) -> np.ndarray:
    """Pixel counts [hot, hot on the class's parts, hot on its bodies, part pixels, body pixels]
    summed over an image's class maps, from its mask and part map (`part` / `body` values): where
    a localization map falls, the discriminative part or the whole object."""
    counts = np.zeros(5, np.int64)
    for plane, cls in zip(np.asarray(maps), classes, strict=True):
        hot, own = (plane >= HOT * plane.max()) & (plane > 0), mask == cls + 1
        on_part, on_body = own & (parts == part), own & (parts == body)
        counts += [hot.sum(), (hot & on_part).sum(), (hot & on_body).sum(), on_part.sum(), on_body.sum()]
    return counts


def hot_region_scores(counts: np.ndarray) -> dict[str, float]:
    """Shares of the hot region on parts / bodies / off the object, and the recall of each."""
    hot, hot_part, hot_body, parts, bodies = (float(c) for c in counts)
    return {
        "hot_on_part": hot_part / max(hot, 1), "hot_on_body": hot_body / max(hot, 1),
        "hot_off_object": 1 - (hot_part + hot_body) / max(hot, 1),
        "part_recall": hot_part / max(parts, 1), "body_recall": hot_body / max(bodies, 1),
        "object_recall": (hot_part + hot_body) / max(parts + bodies, 1),
    }
