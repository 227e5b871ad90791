"""`mcis refine`: PSA's random walk (jiwoon-ahn/psa infer_aff.py) on the maps of any maps run,
with the affinities of an `affinity` run (docs/method.md, "PSA and the random walk").

Per image: AffinityNet's features of the image (one scale, no flip, zero-padded to a multiple
of 8), the dense affinity matrix of the pairs within the radius, T = A^beta over its column sums;
the maps with the background (1 - max)^alpha as channel 0, 8 x 8 averaged, times T^(2^logt) (logt
squarings), upsampled bilinearly and cropped to the image. The walked maps keep their classes and
gain a background plane, which PSA's pseudo-label rule (`pseudolabel.background=walk`) reads.

The dense T of a VOC image (about 63 x 47 cells) is some 3,000 x 3,000 floats, 35 MB; an image
with more than `refine.max_cells` cells is refused rather than run out of memory.
`refine.walk: sparse` takes 2^logt products with a sparse T instead: the same maps to float
tolerance, no cells x cells matrix, 1.5 s instead of 8.3 s an image on 2 shared CPU cores at
VOC size (benchmarks/bench_walk.py, docs/method.md §14.4). On a GPU the
walk runs there; under torchrun the images are shared out by `job.map`.
"""

from __future__ import annotations

import numpy as np
import torch

from mcis_cli import artifacts, engine, maprun, psa, tracking
from mcis_cli.config import WALKED, Config, RefineCfg
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.psa import AffinityNet
from mcis_cli.provenance import dataset_fingerprint
from mcis_cli.stages import StageResult


def padded_input(image: np.ndarray, k: int = psa.STRIDE) -> torch.Tensor:
    """The normalised image zero-padded at the bottom and right to a multiple of k (infer_aff.py:73-89)."""
    x = transforms.to_tensor(image)
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -w % k, 0, -h % k))


@torch.inference_mode()
def refine_maps(model: AffinityNet, image: np.ndarray, maps: np.ndarray, r: RefineCfg,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(walked class maps (n, H, W), walked background (H, W)) of one image."""
    f = model.features(padded_input(image)[None].to(device))
    grid = tuple(f.shape[-2:])
    cells = grid[0] * grid[1]
    if r.walk == "dense" and cells > r.max_cells:
        raise McisError(f"refine: an image of {image.shape[1]} x {image.shape[0]} px has {cells} cells, above "
                        f"refine.max_cells {r.max_cells} (its transition matrix would take "
                        f"{cells * cells * 4 / 2**20:.0f} MB); raise refine.max_cells, set refine.walk=sparse "
                        "or resize the images")
    frm, to = (torch.from_numpy(a).to(device) for a in psa.pair_indices(model.radius, grid))
    aff = psa.affinity(f, frm, to)[0]
    vectors, pooled = psa.walk_input(maps, r.alpha)
    if pooled != grid:
        raise McisError(f"refine: the maps pool to {pooled} cells, the features to {grid}")
    vectors = vectors.to(device)
    if r.walk == "sparse":
        walked = psa.walk_steps(vectors, psa.sparse_transition(aff, frm, to, cells, r.beta), 2 ** r.logt)
    else:
        walked = psa.walk(vectors, psa.transition(psa.dense_affinity(aff, frm, to, cells), r.beta), r.logt)
    out = np.clip(psa.walk_output(walked, grid, image.shape[:2]), 0, 1)
    return out[1:], out[0]


def check_inputs(cfg: Config, maps: tracking.SourceRun, meta: dict, names: list[str], affinity_id: str) -> None:
    """Refuse, in one line, an AffinityNet of another dataset or class count, a maps run of other
    images than the AffinityNet's, or a radius it was not trained with."""
    here = dataset_fingerprint(cfg.data.root)
    if meta["dataset"] != here or meta["num_classes"] != len(names):
        raise McisError(f"affinity run {affinity_id} was trained on another dataset ({meta['num_classes']} "
                        f"classes, lists {meta['dataset']}) than {cfg.data.root} ({len(names)} classes, lists "
                        f"{here}); train AffinityNet on this dataset")
    if maps.tags.get(tracking.FINGERPRINT_TAG) != meta["dataset"]:
        raise McisError(f"maps run {maps.run_id} holds other images than affinity run {affinity_id} was "
                        "trained on (their dataset lists differ); refine maps of the AffinityNet's dataset")
    if cfg.refine.radius is not None and cfg.refine.radius != meta["radius"]:
        raise McisError(f"refine.radius {cfg.refine.radius}: affinity run {affinity_id} was trained with radius "
                        f"{meta['radius']} (stride {meta['stride']}); use its radius, or train one with this radius")


def method_of(maps: tracking.SourceRun) -> str:
    """PSA when the maps are PSA's CAMs, else the maps' method refined: `<method>+rw`."""
    return "psa" if maps.stage == "psa_cam" else f"{maps.method or maps.stage}{WALKED}"


SOURCES = ("psa_cam", *(s for s in artifacts.MAP_STAGES if s not in ("psa_cam", "refine")))  # PSA's CAMs first
STAGE = engine.Stage("refine", reads=SOURCES, sections=("refine", "quality"),
                     memory=lambda cfg: (f"at most {cfg.refine.max_cells} cells an image", "refine.max_cells"))


@STAGE
def run(cfg: Config, from_run: str | None = None, affinity_run: str | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None) -> StageResult:
    """Walked maps for every training image of the maps run, one image at a time."""
    names = voc.class_names(cfg.data.root)
    aff = tracking.resolve_run(cfg, ("affinity",), affinity_run)
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent,
                       extra={"affinity_run": aff.run_id})
    model, meta = job.first(lambda: artifacts.load_psa(aff, "affinity", job.device))
    check_inputs(cfg, job.source, meta, names, aff.run_id)
    maps_dir = job.fetch(artifacts.MAPS)
    samples = voc.train_samples(cfg.data)

    with job.open(tags={tracking.METHOD_TAG: method_of(job.source), "mcis.affinity_run": aff.run_id}):
        def process(todo: list[voc.Sample]):
            for sample in todo:
                maps = artifacts.load_maps(artifacts.map_file(maps_dir, sample.id))[0].astype(np.float32)
                walked, bg = refine_maps(model, transforms.load_image(sample.image), maps, cfg.refine, job.device)
                yield sample, maprun.save(cfg, job.folder, sample, walked, len(names) + 1, background=bg)

        records = job.map("refine", samples, process, key=lambda s: s.id)
        result, scored = maprun.summary(job, records, ["background", *names])
        job.report(lambda log: maprun.report(log, cfg, samples, job.folder, result, scored))
    return job.result(maprun.headline(result), {artifacts.MAPS: str(job.folder / artifacts.MAPS)})
