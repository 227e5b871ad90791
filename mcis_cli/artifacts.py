"""What one stage leaves for the next: the artifact names and the files behind them.

A stage reads another stage's outputs only through this module (localization maps, pseudo masks,
the classifier, the segmenter, resume states), so each file format is written down once and no
stage module imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path

if TYPE_CHECKING:  # torch stays out of the imports of data tools and serving
    import torch
    from torch import nn

    from mcis_cli.config import SegmentCfg
    from mcis_cli.models.mcis import MCISNet
    from mcis_cli.tracking import SourceRun

MODEL = "checkpoints/model.pt"  # a trained model: classify's classifier, segment's segmenter
LAST = "checkpoints/last.pt"  # the resume state of classify and segment
MAPS = "maps"  # localize: <id>.npz per training image
MAP_PREVIEWS = "maps_png"  # localize, localize.previews: <id>_<class>.png per map
PSEUDO = "pseudo"  # pseudolabel: <id>.png per training image, 255 = ignored
ACCUMULATED = "accumulated"  # accumulate (OAA): <id>.npz cumulative attention maps per training image
# the stages whose runs hold MAPS, pseudolabel's inputs (its default first): MCIS's and CAM's maps,
# OAA's and OAA+'s, PSA's CAMs and the random walk's maps of any maps run
MAP_STAGES = ("localize", "accumulate", "integral", "psa_cam", "refine")


# ---- localization maps -----------------------------------------------------------------------
def map_file(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.npz"


def save_maps(path: Path, maps: np.ndarray, classes: Sequence[int], background: np.ndarray | None = None) -> None:
    """<id>.npz with `maps` float16 (n, H, W) and `classes` (0-based), written atomically; with
    `background` (H, W), a background plane too (the random walk's)."""
    extra = {} if background is None else {"background": background.astype(np.float16)}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, maps=maps.astype(np.float16), classes=np.asarray(classes, np.int64), **extra)


def load_maps(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(maps (n, H, W) float16, classes (n,)) of a `save_maps` file."""
    with np.load(path) as data:
        return data["maps"], data["classes"]


def load_background(path: Path) -> np.ndarray | None:
    """The background plane (H, W) float16 of a `save_maps` file, None when it has none."""
    with np.load(path) as data:
        return data["background"] if "background" in data else None


def save_previews(folder: Path, image_id: str, maps: np.ndarray, classes: Sequence[int]) -> None:
    """The official code's format: one uint8 PNG per class, `<id>_<c>.png`."""
    from PIL import Image

    for plane, c in zip(maps, classes, strict=True):
        with atomic_path(folder / f"{image_id}_{c}.png") as tmp:
            Image.fromarray(np.uint8(np.round(plane.astype(np.float32) * 255))).save(tmp, format="PNG")


# ---- pseudo masks --------------------------------------------------------------------------
def mask_file(folder: Path, image_id: str) -> Path:
    return folder / f"{image_id}.png"


# ---- models ----------------------------------------------------------------------------------
def classifier_file(model: MCISNet, input_size: int, method: str) -> dict[str, Any]:
    """What localize loads: the weights and the hyper-parameters that rebuild the classifier."""
    return {
        "state_dict": model.state_dict(), "num_classes": model.num_classes,
        "width": model.width, "batch_norm": model.batch_norm, "blocks": model.blocks,
        "affinity": model.affinity_kind, "temperature": model.temperature,
        "input_size": input_size, "method": method,
    }


def load_classifier(source: SourceRun, device: torch.device) -> tuple[MCISNet, dict]:
    """The classify run's model in eval mode on `device`, and its metadata (input_size, method, ...)."""
    from mcis_cli.checkpoints import load_checkpoint
    from mcis_cli.models.mcis import MCISNet

    state = load_checkpoint(source.fetch(MODEL))
    model = MCISNet.from_checkpoint(state).to(device).eval()
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    meta.setdefault("input_size", source.config().classify.input_size)
    return model, meta


def psa_file(model: nn.Module, kind: str, dataset: str, **meta: Any) -> dict[str, Any]:
    """What PSA's stages load: a classifier or an AffinityNet, what rebuilds it, and the dataset
    fingerprint (and class count) it was trained on, which `refine` checks."""
    return {"state_dict": model.state_dict(), "kind": kind, "dataset": dataset, **meta}


def load_psa(source: SourceRun, kind: str, device: torch.device) -> tuple[nn.Module, dict]:
    """The `kind` ("classifier" or "affinity") model of a PSA run in eval mode, and its metadata."""
    from mcis_cli.checkpoints import load_checkpoint
    from mcis_cli.models.psa import AffinityNet, PSAClassifier

    state = load_checkpoint(source.fetch(MODEL))
    if state.get("kind") != kind:
        raise McisError(f"run {source.run_id} holds no PSA {kind} model")
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    arch = {k: meta[k] for k in ("width", "batch_norm", "blocks")}
    model = (PSAClassifier(meta["num_classes"], **arch) if kind == "classifier" else
             AffinityNet(**arch, radius=meta["radius"], fc6_dilation=meta["fc6_dilation"]))
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), meta


def segmenter_file(model: nn.Module, seg: SegmentCfg, class_names: Sequence[str],
                   mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """What evaluate and export load: the weights, the hyper-parameters that rebuild the model,
    the class names (background first) and the input normalisation."""
    return {
        "state_dict": model.state_dict(), "arch": seg.arch, "num_classes": len(class_names),
        "width": model.width, "batch_norm": seg.batch_norm, "blocks": seg.blocks,
        "class_names": list(class_names), "mean": list(mean), "std": list(std),
    }


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict]:
    """The model of a segment run's MODEL file, in eval mode on the CPU, and its metadata
    (arch, num_classes, width, class_names with background first, mean, std)."""
    from mcis_cli.checkpoints import load_checkpoint
    from mcis_cli.config import SegmentCfg
    from mcis_cli.models.deeplab import build_segmenter

    state = load_checkpoint(path)
    missing = {"state_dict", "arch", "num_classes", "width"} - state.keys()
    if missing:
        raise McisError(f"{path} is not a segment model file: it lacks {sorted(missing)}")
    seg = SegmentCfg(arch=state["arch"], width=state["width"], batch_norm=state.get("batch_norm", False),
                     blocks=state.get("blocks", 5))
    model = build_segmenter(seg, state["num_classes"])
    model.load_state_dict(state["state_dict"])
    return model.eval(), {k: v for k, v in state.items() if k != "state_dict"}
