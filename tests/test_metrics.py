"""Confusion matrix and scores against scikit-learn; ignore handling; the map threshold sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score, precision_score, recall_score

from mcis_cli import metrics
from mcis_cli.errors import McisError


def _label_maps(seed: int, k: int, shape=(37, 53), ignore=0.15):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, shape).astype(np.uint8)
    gt[rng.random(shape) < ignore] = 255
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, k, shape)).astype(np.uint8)
    pred[pred == 255] = 0
    return pred, gt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_scores_agree_with_sklearn(seed):
    k = 6
    pred, gt = _label_maps(seed, k)
    cm = metrics.confusion_matrix(pred, gt, k)
    keep = gt != 255
    y_true, y_pred = gt[keep], pred[keep]
    np.testing.assert_array_equal(cm, sk_confusion(y_true, y_pred, labels=range(k)))
    result = metrics.scores(cm, [f"c{i}" for i in range(k)])
    np.testing.assert_allclose(list(result["iou"].values()),
                               jaccard_score(y_true, y_pred, labels=range(k), average=None))
    np.testing.assert_allclose(list(result["precision"].values()),
                               precision_score(y_true, y_pred, labels=range(k), average=None))
    np.testing.assert_allclose(list(result["recall"].values()),
                               recall_score(y_true, y_pred, labels=range(k), average=None))
    assert result["miou"] == pytest.approx(jaccard_score(y_true, y_pred, average="macro"))
    assert result["pixel_acc"] == pytest.approx((y_true == y_pred).mean())
    weights = np.bincount(y_true, minlength=k) / y_true.size
    assert result["fw_iou"] == pytest.approx(float(weights @ jaccard_score(y_true, y_pred, average=None)))


def test_absent_class_is_nan_and_left_out_of_the_means():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    result = metrics.scores(metrics.confusion_matrix(pred, gt, 3), ["bg", "a", "never"])
    assert math.isnan(result["iou"]["never"]) and math.isnan(result["recall"]["never"])
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)
    flat = metrics.mlflow_metrics(result)
    assert "iou/never" not in flat and flat["iou/a"] == pytest.approx(2 / 3)


def test_predicted_class_absent_from_truth_still_counts_as_false_positive():
    gt = np.zeros((1, 4), np.uint8)
    pred = np.array([[0, 0, 2, 2]])
    result = metrics.scores(metrics.confusion_matrix(pred, gt, 3), ["bg", "a", "b"])
    assert result["iou"]["b"] == 0.0  # present in the prediction: it scores, and pulls mIoU down
    assert result["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_ignore_pred_leaves_unlabelled_pseudo_pixels_out():
    pred, gt = _label_maps(3, 4)
    pseudo = pred.copy()
    pseudo[::3] = 255
    with pytest.raises(McisError, match="ignore_pred"):
        metrics.confusion_matrix(pseudo, gt, 4)
    cm = metrics.confusion_matrix(pseudo, gt, 4, ignore_pred=True)
    keep = (gt != 255) & (pseudo != 255)
    np.testing.assert_array_equal(cm, sk_confusion(gt[keep], pseudo[keep], labels=range(4)))


def test_bad_inputs_are_named():
    with pytest.raises(McisError, match="differ in size"):
        metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 2)
    with pytest.raises(McisError, match="ground truth holds label 7"):
        metrics.confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), 3)


def test_mlflow_keys_are_flat_and_legal():
    result = metrics.scores(np.eye(2, dtype=np.int64), ["background", "potted plant (x)"])
    flat = metrics.mlflow_metrics(result, prefix="nocrf/")
    assert flat["nocrf/miou"] == 1.0
    assert "nocrf/iou/potted plant _x_" in flat
    assert {"nocrf/pixel_acc", "nocrf/mean_acc", "nocrf/fw_iou", "nocrf/precision/background"} <= set(flat)


def test_threshold_sweep_matches_argmax_over_background_and_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 9, 11)).astype(np.float16)
    classes = [4, 1]  # 0-based ids of the present classes -> labels 5 and 2
    gt = rng.integers(0, 6, (9, 11))
    thresholds = [0.1, 0.5, 0.9]
    cms = metrics.threshold_sweep(maps, classes, gt, thresholds, 6)
    for t, cm in zip(thresholds, cms, strict=True):
        stacked = np.concatenate([np.full((1, 9, 11), t, np.float32), maps.astype(np.float32)])
        expected = np.array([0, 5, 2])[stacked.argmax(0)]
        np.testing.assert_array_equal(metrics.labels_from_maps(maps, classes, t), expected)
        np.testing.assert_array_equal(cm, metrics.confusion_matrix(expected, gt, 6))
    empty = metrics.threshold_sweep(np.zeros((0, 9, 11)), [], gt, thresholds, 6)
    assert (empty[:, :, 1:] == 0).all()  # no maps: all background


def test_hot_region_counts_place_a_map_on_part_body_and_background():
    """A 1 x 6 image: background, body, body, part, background, other class's body; the map is
    hot (>= half its peak) on one body pixel, the part and one background pixel."""
    mask = np.array([[0, 1, 1, 1, 0, 2]])
    parts = np.array([[0, 1, 1, 2, 0, 1]])
    plane = np.array([[0.1, 0.2, 0.6, 1.2, 0.7, 0.9]])  # peak 1.2: hot from 0.6 on
    counts = metrics.hot_region_counts(plane[None], [0], mask, parts)
    assert counts.tolist() == [4, 1, 1, 1, 2]
    scores = metrics.hot_region_scores(counts)
    assert scores["hot_on_part"] == 0.25 and scores["hot_off_object"] == 0.5
    assert scores["part_recall"] == 1.0 and scores["body_recall"] == 0.5 and scores["object_recall"] == 2 / 3
    assert metrics.hot_region_counts(np.zeros((1, 1, 6)), [0], mask, parts).tolist() == [0, 0, 0, 1, 2]
