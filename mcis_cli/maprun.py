"""What every stage that writes localization maps shares (localize, and each method's own maps
stage): an image's maps saved with their quality record, the run's `maps/*` scores, its report.

So the maps of every method are stored, scored and shown alike, and `pseudolabel`, `evaluate`
and the comparison read them without knowing which method made them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mcis_cli import artifacts, engine, metrics, quality, reporting, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc

OVERLAYS = 8  # images in the maps_overlays picture
HEADLINE = ("maps/miou", "maps/best_threshold", "maps/hot_on_part", "maps/hot_on_body", "maps/hot_off_object",
            "maps/part_recall", "maps/body_recall")


def save(cfg: Config, folder: Path, sample: voc.Sample, maps: np.ndarray, num_classes: int,
         background: np.ndarray | None = None) -> dict:
    """Write one image's maps (n, H, W) in [0, 1] for its classes (and a background plane, when
    the method makes one); its record: the planes, the empty ones, and where it has a mask, its
    sweep and hot-region counts (scored as stored)."""
    extra = {} if background is None else {"background": background}  # a class-maps-only call otherwise
    artifacts.save_maps(artifacts.map_file(folder / artifacts.MAPS, sample.id), maps, sample.labels, **extra)
    if cfg.localize.previews:
        artifacts.save_previews(folder / artifacts.MAP_PREVIEWS, sample.id, maps, sample.labels)
    record = {"planes": len(maps), "empty": int((maps.reshape(len(maps), -1).max(1) <= 0).sum())}
    root = cfg.data.root
    if voc.mask_path(root, sample.id).is_file():
        record |= quality.maps_record(maps.astype(np.float16), sample.labels, voc.load_mask(root, sample.id),
                                      voc.load_parts(root, sample.id), cfg.quality.bg_sweep, num_classes)
    return record


def summary(job: engine.Job, records: engine.Records, names: Sequence[str]) -> tuple[dict[str, float], dict | None]:
    """The run's metrics from its records (`names` with background first) and the sweep's scores;
    a warning when most maps are empty."""
    planes, empty, sweep, hot = records.summed("planes", "empty", "sweep", "hot")
    planes, empty = (0, 0) if planes is None else (int(planes), int(empty))
    if planes and empty / planes > 0.5:  # issue #17 of the official repo: "maps all black"
        job.warn(f"warning: {empty} of {planes} maps are empty: the network gives no positive evidence "
                 "for the image's own classes; train it longer")
    result = {"maps/images": float(len(records)), "maps/computed": float(records.computed)}
    if planes:
        result["maps/empty_frac"] = empty / planes
    thresholds = job.cfg.quality.bg_sweep
    scored = None if sweep is None else quality.maps_scores(sweep, hot, names, thresholds)
    if scored is not None:
        result.update(metrics.mlflow_metrics(scored["curve"][scored["best"]], prefix="maps/"))
        result["maps/best_threshold"] = scored["threshold"]
        result.update({f"maps/{key}": value for key, value in scored["hot"].items()})
    return result, scored


def headline(result: dict[str, float]) -> dict[str, float]:
    return {k: result[k] for k in HEADLINE if k in result} or result


def report(log: tracking.Tracker, cfg: Config, samples: Sequence[voc.Sample], folder: Path,
           result: dict[str, float], scored: dict | None) -> None:
    """The sweep, the metrics, the maps (and previews) and the overlays of the first images."""
    if scored is not None:
        for step, (t, s) in enumerate(zip(cfg.quality.bg_sweep, scored["curve"], strict=True)):
            log.log_metrics({"maps/sweep_miou": s["miou"], "maps/sweep_threshold": t}, step=step)
    log.log_metrics(result)
    log.log_artifacts(folder / artifacts.MAPS, artifacts.MAPS)
    if cfg.localize.previews:
        log.log_artifacts(folder / artifacts.MAP_PREVIEWS, artifacts.MAP_PREVIEWS)
    rows = []
    for sample in samples[:OVERLAYS]:
        image = transforms.load_image(sample.image)
        planes, _ = artifacts.load_maps(artifacts.map_file(folder / artifacts.MAPS, sample.id))
        heat = planes.astype(np.float32).max(0) if len(planes) else np.zeros(image.shape[:2], np.float32)
        rows.append([image, reporting.heat_overlay(image, heat)])
    if rows:
        log.log_image(reporting.overlay_grid(rows), "maps_overlays")
