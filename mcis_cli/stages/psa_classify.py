"""`mcis psa-classify`: PSA's classifier, the VGG16 variant with its CAM head, trained on
image-level labels as jiwoon-ahn/psa train_cls.py does (docs/method.md, "PSA and the random walk").

Its own stage, not a method of `classify`: PSA's network, augmentation (random long side, crop,
no pairs), loss and schedule share nothing with the co-attention classifier but the training
skeleton, which both take from `training.py` / `psatrain.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mcis_cli import artifacts, engine, psatrain, tracking, training
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.psa import PSAClassifier
from mcis_cli.provenance import dataset_fingerprint
from mcis_cli.stages import StageResult

NAME = "psa_classify"
METHOD = "psa"


class ClassifierData(psatrain.EpochData):
    """train_cls.py:63-72: the long side resized to a random integer in scale_range (bicubic),
    a flip with p 0.5, colour jitter, a random crop padded with the mean colour."""

    def __init__(self, samples: list[voc.Sample], num_classes: int, cfg: Config):
        super().__init__(NAME, samples, cfg.psa, cfg.seed)
        self.num_classes = num_classes

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, sample, rng = self.c, self.samples[index], self.rng(index)
        image = transforms.load_image(sample.image)
        h, w = image.shape[:2]
        side = rng.randint(*c.scale_range)
        scale = side / max(h, w)
        image = transforms.resize(image, (max(1, round(h * scale)), max(1, round(w * scale))), "bicubic")
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if any(c.color_jitter):
            image = transforms.color_jitter(np.ascontiguousarray(image), c.color_jitter, rng)
        image = psatrain.crop(image, psatrain.crop_window(image.shape[:2], c.crop, rng), c.crop,
                              transforms.MEAN_RGB)
        labels = torch.zeros(self.num_classes)
        labels[list(sample.labels)] = 1.0
        return {"image": psatrain.chw(image), "labels": labels}


class Criterion(torch.nn.Module):
    """The model and its loss as one module, so DDP sees one forward per step."""

    def __init__(self, model: PSAClassifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        loss = F.multilabel_soft_margin_loss(self.model(transforms.normalize(images)), labels)  # train_cls.py:125
        return loss, {"cls": loss}


def _memory(cfg: Config) -> tuple[str, str]:
    return f"{cfg.psa.batch_size} crops of {cfg.psa.crop} px, width {cfg.psa.width}", "psa.batch_size"


STAGE = engine.Stage(NAME, sections=("psa",), memory=_memory)


@STAGE
def run(cfg: Config, resume: str | None = None, parent: tracking.Nest | None = None) -> StageResult:
    """Train (or continue) PSA's classifier; log to MLflow; return the summary."""
    c = cfg.psa
    psatrain.check_pretrained("psa", c)
    training.check_split(NAME, c.batch_size)
    job = engine.start(STAGE, cfg, resume=resume, parent=parent)
    names = voc.class_names(cfg.data.root)
    samples = voc.train_samples(cfg.data)
    if not samples:
        raise McisError(f"the training list {cfg.data.train_list!r} of {cfg.data.root} is empty")
    model = PSAClassifier(len(names), c.width, c.batch_norm, c.blocks, frozen=c.pretrained)
    trainer = psatrain.trainer(NAME, model, c, cfg.speed, job.device)
    criterion = trainer.parallel(Criterion(model))
    meta = {"num_classes": len(names), "width": c.width, "batch_norm": c.batch_norm, "blocks": c.blocks}

    with job.open(tags={tracking.METHOD_TAG: METHOD}, params={"effective_batch": c.batch_size}):
        metrics = psatrain.train(
            job, trainer, ClassifierData(samples, len(names), cfg), c,
            lambda batch: criterion(batch["image"], batch["labels"]),
            lambda: artifacts.psa_file(model, "classifier", dataset_fingerprint(cfg.data.root), **meta))
    return job.result(metrics, {"checkpoint": str(job.folder / artifacts.MODEL)})
