"""`mcis affinity`: PSA's confident labels and AffinityNet (jiwoon-ahn/psa infer_cls.py,
train_aff.py; docs/method.md, "PSA and the random walk").

From a maps run (PSA's CAMs): for each image the background (1 - max CAM)^alpha at the low and the
high alpha, each stacked before the CAMs and refined by the dense CRF with the official settings
(`affinity.crf`); the two marginals are kept per image (as uint8, 1/255 steps) in the run's
records. Training crops image and marginals together, averages the marginals over 8 x 8 blocks
and applies the confident-label rule (`psa.confident_labels`), then labels the pairs within the
radius and trains AffinityNet on bg-pos/4 + fg-pos/4 + neg/2.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from mcis_cli import artifacts, crf, engine, psa, psatrain, tracking, training
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.psa import AffinityNet
from mcis_cli.provenance import dataset_fingerprint
from mcis_cli.stages import StageResult

NAME = "affinity"
LABELS = "confident"  # the job.map label of the CRF marginals


def crf_scores(inputs: Iterable[tuple[np.ndarray, np.ndarray]], cfg: Config) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(low, high) CRF marginals (1 + n, H, W) of each (image, CAMs), the background first
    (infer_cls.py:92-110), lazily from the CRF pool."""
    a = cfg.affinity
    items = ((image, np.concatenate([psa.background(m, alpha)[None], m]))
             for image, m in inputs for alpha in (a.alpha_low, a.alpha_high))
    refined = iter(crf.crf_map(items, a.crf, a.jobs))
    return zip(refined, refined, strict=True)  # consecutive: the low, then the high alpha


def quantized(scores: np.ndarray) -> np.ndarray:
    return np.round(np.clip(scores, 0, 1) * 255).astype(np.uint8)


class AffinityData(psatrain.EpochData):
    """train_aff.py:45-62: colour jitter, a random crop (black padding, scores 0 there), a flip
    with p 0.5; the crop's confident labels at stride 8 and its pair labels."""

    def __init__(self, samples: list[voc.Sample], records: engine.Records, cfg: Config):
        super().__init__(NAME, samples, cfg.affinity, cfg.seed)
        self.records = records

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, sample, rng = self.c, self.samples[index], self.rng(index)
        image = transforms.load_image(sample.image)
        if any(c.color_jitter):
            image = transforms.color_jitter(image, c.color_jitter, rng)
        record = self.records.get(sample.id)
        scores = np.concatenate([record["low"], record["high"]]).transpose(1, 2, 0)
        window = psatrain.crop_window(image.shape[:2], c.crop, rng)
        image, scores = (psatrain.crop(a, window, c.crop, 0) for a in (image, scores))
        if rng.random() < 0.5:
            image, scores = image[:, ::-1], scores[:, ::-1]
        pooled = psa.block_average(scores.transpose(2, 0, 1).astype(np.float32) / 255)
        n = len(record["low"])
        bg, fg, neg = psa.pair_labels(psa.confident_labels(pooled[:n], pooled[n:]), c.radius)
        return {"image": psatrain.chw(image), "bg": torch.from_numpy(bg), "fg": torch.from_numpy(fg),
                "neg": torch.from_numpy(neg)}


class Criterion(torch.nn.Module):
    def __init__(self, model: AffinityNet):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]):
        return psa.affinity_loss(self.model(transforms.normalize(batch["image"])), batch["bg"], batch["fg"],
                                 batch["neg"])


def _check(cfg: Config, source: tracking.SourceRun) -> None:
    if source.tags.get(tracking.FINGERPRINT_TAG) != dataset_fingerprint(cfg.data.root):
        raise McisError(f"maps run {source.run_id} was made on another dataset than {cfg.data.root} "
                        "(its lists differ); train AffinityNet on the dataset of its maps")


def _memory(cfg: Config) -> tuple[str, str]:
    a = cfg.affinity
    return f"{a.batch_size} crops of {a.crop} px, width {a.width}", "affinity.batch_size"


STAGE = engine.Stage(NAME, reads=("psa_cam",), sections=(NAME,), memory=_memory)


@STAGE
def run(cfg: Config, from_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Confident labels of every training image, then AffinityNet trained on their pairs."""
    a = cfg.affinity
    psatrain.check_pretrained(NAME, a)
    training.check_split(NAME, a.batch_size)
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent)
    names = voc.class_names(cfg.data.root)
    _check(cfg, job.source)
    maps_dir = job.fetch(artifacts.MAPS)
    samples = voc.train_samples(cfg.data)
    model = AffinityNet(a.width, a.batch_norm, a.blocks, a.radius, a.fc6_dilation, frozen=a.pretrained)
    trainer = psatrain.trainer(NAME, model, a, cfg.speed, job.device)
    criterion = trainer.parallel(Criterion(model))
    meta = {"num_classes": len(names), "stride": psa.STRIDE, **model.config}

    with job.open(tags={tracking.METHOD_TAG: "psa"}, params={"effective_batch": a.batch_size}):
        def process(todo: list[voc.Sample]):
            inputs = ((transforms.load_image(s.image),
                       artifacts.load_maps(artifacts.map_file(maps_dir, s.id))[0].astype(np.float32)) for s in todo)
            for sample, (low, high) in zip(todo, crf_scores(inputs, cfg), strict=True):
                yield sample, {"low": quantized(low), "high": quantized(high)}

        records = job.map(LABELS, samples, process, key=lambda s: s.id, chunk=max(1, a.jobs))
        metrics = psatrain.train(
            job, trainer, AffinityData(samples, records, cfg), a, criterion,
            lambda: artifacts.psa_file(model, "affinity", dataset_fingerprint(cfg.data.root), **meta))
    return job.result(metrics, {"checkpoint": str(job.folder / artifacts.MODEL)})
