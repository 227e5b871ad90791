"""`mcis psa-cam`: PSA's CAMs of every training image from a `psa_classify` run, as
jiwoon-ahn/psa infer_cls.py makes them: scales 1, 0.5, 1.5, 2 (bicubic from the original size),
each plain and flipped; sqrt(ReLU(fc8)) upsampled bilinearly to the image, the image's classes
kept, flipped back, summed, each class divided by its max + 1e-5 (infer_cls.py:41, 59-80).

These are the maps AffinityNet learns from (`affinity`) and the random walk refines (`refine`);
scored and stored as every method's maps (`maprun`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mcis_cli import artifacts, engine, maprun, psa, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.psa import PSAClassifier
from mcis_cli.provenance import dataset_fingerprint
from mcis_cli.stages import StageResult


@torch.inference_mode()
def cams(model: PSAClassifier, image: np.ndarray, classes: Sequence[int], scales: Sequence[float],
         flip: bool, device: torch.device) -> np.ndarray:
    """(n, H, W) fused CAMs of the image's classes, in [0, 1)."""
    h, w = image.shape[:2]
    passes = []
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = transforms.to_tensor(transforms.resize(image, size, "bicubic"))[None].to(device)
        for flipped in (False, True) if flip else (False,):
            cam = model.cam(x.flip(-1) if flipped else x)
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[0, list(classes)]
            passes.append(cam.flip(-1) if flipped else cam)
    return psa.fuse_cams(torch.stack(passes).float()).cpu().numpy()


def _check(cfg: Config, meta: dict, names: Sequence[str]) -> None:
    if meta["num_classes"] != len(names):
        raise McisError(f"the psa_classify run has {meta['num_classes']} classes, {cfg.data.root} has "
                        f"{len(names)}; make CAMs with the dataset the classifier was trained on")
    if meta["dataset"] != dataset_fingerprint(cfg.data.root):
        raise McisError(f"the psa_classify run was trained on another dataset than {cfg.data.root} "
                        "(its lists differ); make CAMs with the dataset the classifier was trained on")


STAGE = engine.Stage("psa_cam", reads=("psa_classify",), sections=("psa", "quality"),
                     memory=lambda cfg: (f"scales {cfg.psa.cam_scales}", "psa.cam_scales"))


@STAGE
def run(cfg: Config, from_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """CAMs for every training image, one image at a time (each at its own size)."""
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent)
    model, meta = job.first(lambda: artifacts.load_psa(job.source, "classifier", job.device))
    names = voc.class_names(cfg.data.root)
    _check(cfg, meta, names)
    samples = voc.train_samples(cfg.data)
    c = cfg.psa

    with job.open(tags={tracking.METHOD_TAG: "psa"}):
        def process(todo: list[voc.Sample]):
            for sample in todo:
                maps = cams(model, transforms.load_image(sample.image), sample.labels, c.cam_scales,
                            c.cam_flip, job.device)
                yield sample, maprun.save(cfg, job.folder, sample, maps, len(names) + 1)

        records = job.map("psa_cam", samples, process, key=lambda s: s.id)
        result, scored = maprun.summary(job, records, ["background", *names])
        job.report(lambda log: maprun.report(log, cfg, samples, job.folder, result, scored))
    return job.result(maprun.headline(result), {artifacts.MAPS: str(job.folder / artifacts.MAPS)})
