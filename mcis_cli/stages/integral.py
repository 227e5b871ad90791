"""`mcis integral`: OAA+, the integral attention model (docs/method.md "OAA and OAA+").

A fresh OAA network (ImageNet init, as OAA-PyTorch train_iam.py) learns to output OAA's cumulative
maps: its class maps are trained against the store of an `accumulate` run (each GT class's map /
255, other classes 0) with the official hybrid loss, on the same inputs (short side resized, no
flip, list order). Then it infers a map per GT class of every training image (one scale, ReLU,
/ max, bicubic to image size, as test_iam.py), saved as the run's maps.
"""

from __future__ import annotations

import numpy as np
import torch

from mcis_cli import artifacts, engine, maprun, oaa, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.oaa import iam_loss, normalise_attention
from mcis_cli.stages import StageResult

NAME = "integral"
METHOD = "oaa+"


def iam_maps(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The IAM's class maps (n, h, w) -> float32 (n, H, W) in [0, 1] (test_iam.py:63-96): ReLU,
    / max, x 255 truncated to uint8, bicubic to the image size."""
    planes = (normalise_attention(maps.float()) * 255).floor().to(torch.uint8).cpu().numpy()
    return oaa.bicubic_uint8(planes, size).astype(np.float32) / 255


def targets(store: oaa.AttentionStore, sample: voc.Sample, num_classes: int, shape: tuple[int, int]) -> torch.Tensor:
    """The IAM's target (K, h, w): each GT class's cumulative map / 255, every other channel 0
    (LoadData.py:162-181)."""
    planes, _ = store.planes(sample.id, len(sample.labels), shape)
    if planes.shape[1:] != shape:
        raise McisError(f"the cumulative maps of {sample.id} are {planes.shape[1:]}, the integral model's "
                        f"output {shape}: train integral at the accumulate run's input size")
    q = torch.zeros(num_classes, *shape)
    q[list(sample.labels)] = torch.from_numpy(planes.astype(np.float32) / 255)
    return q


def _memory(cfg: Config) -> tuple[str, str]:
    c = cfg.integral
    return (f"batches of {c.batch_size} images, short side {c.input_size} px, width {c.width}",
            "integral.input_size or integral.batch_size")


STAGE = engine.Stage(NAME, reads=("accumulate",), sections=(NAME, "quality"), memory=_memory, one_process=True)


@STAGE
def run(cfg: Config, from_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Train the integral attention model on an accumulate run's maps; write its maps."""
    c = cfg.integral
    oaa.check_pretrained(c, NAME)
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent)
    trained_at = job.source.config().accumulate.input_size
    if trained_at != c.input_size:
        raise McisError(f"integral.input_size is {c.input_size} but accumulate run {job.source.run_id} made its "
                        f"maps at {trained_at}: the targets must match the output; set integral.input_size={trained_at}")
    names = voc.class_names(cfg.data.root)
    samples = voc.train_samples(cfg.data)
    oaa.check_batchable(samples, c, NAME)
    store = oaa.AttentionStore(job.fetch(artifacts.ACCUMULATED))
    trainer = oaa.OaaTrainer(NAME, cfg, c, len(names), job.device, divide_by_iter_size=not c.loss_sum_over_iter)
    dataset = oaa.OaaDataset(samples, len(names), c, cfg.seed,
                             target=lambda i, shape: targets(store, samples[i], len(names), shape))

    def loss(maps: torch.Tensor, batch: dict) -> torch.Tensor:
        return iam_loss(maps, batch["q"].to(maps.device), c.positive_above)

    with job.open(tags={tracking.METHOD_TAG: METHOD}, params={"effective_batch": c.batch_size * c.iter_size}):
        step = oaa.fit(job, trainer, c, dataset, loss)
        trainer.model.eval()

        @torch.inference_mode()
        def process(todo: list[tuple[int, voc.Sample]]):
            for index, sample in todo:
                x = transforms.to_tensor(dataset.image(index))[None].to(job.device)
                maps = trainer.model(x)[0, list(sample.labels)]
                size = transforms.image_size(sample.image)
                yield (index, sample), maprun.save(cfg, job.folder, sample, iam_maps(maps, size), len(names) + 1)

        records = job.map(NAME, list(enumerate(samples)), process, key=lambda item: item[1].id, chunk=16)
        result, scored = maprun.summary(job, records, ["background", *names])
        job.report(lambda log: maprun.report(log, cfg, samples, job.folder, result, scored))
    return job.result({**maprun.headline(result), "steps": step}, {artifacts.MAPS: str(job.folder / artifacts.MAPS)})
