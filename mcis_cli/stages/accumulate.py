"""`mcis accumulate`: OAA, online attention accumulation (docs/method.md "OAA and OAA+").

The OAA classifier trains on single images; after each forward, from the same forward (the
weights before the step), each GT class map of each image is normalised and, if the class is among
the image's top-k predictions, fused by element-wise max into the image's cumulative map, kept as
8-bit planes at feature resolution in a store keyed by image id (`oaa.AttentionStore`). The store
is part of the resume state, so a killed run continues with the maps it had at its checkpoint.
At the end each cumulative map is resized as OAA-PyTorch res.py does and saved as the run's maps;
the store itself is logged (`accumulated/`) for OAA+ (`mcis integral`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mcis_cli import artifacts, engine, maprun, oaa, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.oaa import normalise_attention, scores, top_k_classes
from mcis_cli.stages import StageResult

NAME = "accumulate"
METHOD = "oaa"
RES_EPS = 1e-8  # res.py's min-max guard


# ---- the rules (reference: OAA-PyTorch models/vgg.py:63-96, res.py:42-67) --------------------
def accumulating(epoch: int, start_epoch: int) -> bool:
    """The start rule: nothing is stored before `start_epoch` (official: epoch 0 stores nothing,
    vgg.py:67)."""
    return epoch >= start_epoch


def quantise(maps: torch.Tensor) -> np.ndarray:
    """Normalised maps in [0, 1] -> uint8 as the official store writes them: x 255, then cv2.imwrite's
    conversion of a float array, which rounds half to even and saturates."""
    return np.clip(np.rint(maps.float().cpu().numpy() * np.float32(255)), 0, 255).astype(np.uint8)


def accumulate_class(stored: np.ndarray | None, current: np.ndarray, accepted: bool,
                     fallback: bool) -> np.ndarray | None:
    """One class's cumulative map after one forward (vgg.py:83-96): an accepted map is stored the
    first time and max-fused after; a rejected one changes nothing, except under `fallback` (the
    last epoch) when the class has no map yet: then it is stored unfiltered."""
    if accepted:
        return current if stored is None else np.maximum(stored, current)
    if fallback and stored is None:
        return current
    return stored


def update_image(store: oaa.AttentionStore, sample: voc.Sample, maps: torch.Tensor, fallback: bool) -> None:
    """Fold one image's class maps (K, h, w) of this forward into its cumulative maps; the filter
    accepts the k = |GT classes| highest-scoring classes (scores: the GAP of these maps)."""
    labels = list(sample.labels)
    if not labels:
        return
    accepted = set(top_k_classes(scores(maps[None])[0], len(labels)))
    current = quantise(normalise_attention(maps[labels]))
    old, stored = store.planes(sample.id, len(labels), current.shape[1:])
    new = [accumulate_class(old[j] if stored[j] else None, current[j], c in accepted, fallback)
           for j, c in enumerate(labels)]
    if all(m is None for m in new):
        return
    store.put(sample.id, np.stack([old[j] if m is None else m for j, m in enumerate(new)]),
              np.array([m is not None for m in new]))


def res_maps(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cumulative maps uint8 (n, h, w) -> float32 (n, H, W) in [0, 1] at image size, as res.py:
    bicubic resize (to uint8), min-max normalisation, x 255 truncated to uint8. The peak is 254
    (the 1e-8 guard), and a constant map becomes all 0."""
    out = oaa.bicubic_uint8(planes, size).astype(np.float64)
    low = out.min(axis=(1, 2), keepdims=True)
    high = out.max(axis=(1, 2), keepdims=True)
    return ((out - low) / (high - low + RES_EPS) * 255).astype(np.uint8).astype(np.float32) / 255


# ---- the stage -------------------------------------------------------------------------------
def stored_fraction(store: oaa.AttentionStore, samples: Sequence[voc.Sample]) -> float:
    """The share of (image, GT class) that have a cumulative map."""
    total = sum(len(s.labels) for s in samples)
    found = sum(int(got[1].sum()) for s in samples if (got := store.get(s.id)) is not None)
    return found / total if total else 0.0


def _memory(cfg: Config) -> tuple[str, str]:
    c = cfg.accumulate
    return (f"batches of {c.batch_size} images, short side {c.input_size} px, width {c.width}",
            "accumulate.input_size or accumulate.batch_size")


STAGE = engine.Stage(NAME, sections=(NAME, "quality"), memory=_memory, one_process=True)


@STAGE
def run(cfg: Config, resume: str | None = None, parent: tracking.Nest | None = None) -> StageResult:
    """Train the OAA classifier while accumulating its attention; write the cumulative maps."""
    c = cfg.accumulate
    oaa.check_pretrained(c, NAME)
    job = engine.start(STAGE, cfg, resume=resume, parent=parent)
    names = voc.class_names(cfg.data.root)
    samples = voc.train_samples(cfg.data)
    if not samples:
        raise McisError(f"the training list {cfg.data.train_list!r} of {cfg.data.root} is empty")
    oaa.check_batchable(samples, c, NAME)
    trainer = oaa.OaaTrainer(NAME, cfg, c, len(names), job.device, divide_by_iter_size=True)
    dataset = oaa.OaaDataset(samples, len(names), c, cfg.seed)

    with job.open(tags={tracking.METHOD_TAG: METHOD}, params={"effective_batch": c.batch_size * c.iter_size}):
        store = oaa.AttentionStore(job.folder / artifacts.ACCUMULATED)

        def loss(maps: torch.Tensor, batch: dict) -> torch.Tensor:
            return F.multilabel_soft_margin_loss(scores(maps), batch["y"].to(maps.device))

        def seen(maps: torch.Tensor, batch: dict, epoch: int) -> None:
            if accumulating(epoch, c.start_epoch):
                fallback = c.last_epoch_fallback and epoch == c.epochs - 1
                for row, index in enumerate(batch["index"].tolist()):
                    update_image(store, samples[index], maps[row], fallback)

        step = oaa.fit(job, trainer, c, dataset, loss, seen=seen, kept=lambda: {"accumulated": store.snapshot()},
                       # a new run starts empty; a resumed one drops what a killed start wrote after its checkpoint
                       restore=lambda state: store.restore(state["accumulated"] if state else {}),
                       metrics=lambda: {"accumulate/stored_frac": stored_fraction(store, samples)})

        def process(todo: list[tuple[int, voc.Sample]]):
            for index, sample in todo:
                size = transforms.image_size(sample.image)
                shape = oaa.feature_size(oaa.short_side_size(size, c.input_size))
                planes, _ = store.planes(sample.id, len(sample.labels), shape)
                yield (index, sample), maprun.save(cfg, job.folder, sample, res_maps(planes, size), len(names) + 1)

        records = job.map(NAME, list(enumerate(samples)), process, key=lambda item: item[1].id, chunk=16)
        result, scored = maprun.summary(job, records, ["background", *names])
        result["accumulate/stored_frac"] = stored_fraction(store, samples)
        job.report(lambda log: (maprun.report(log, cfg, samples, job.folder, result, scored),
                                log.log_artifacts(store.folder, artifacts.ACCUMULATED)))
    return job.result({**maprun.headline(result), "steps": step},
                      {artifacts.MAPS: str(job.folder / artifacts.MAPS), artifacts.ACCUMULATED: str(store.folder)})
