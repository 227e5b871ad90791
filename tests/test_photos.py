"""Real photographs through `mcis predict` and the served model: every mask has the size the photo
is displayed at, whatever its form (EXIF-turned, greyscale, CMYK, 16-bit, palette), and a photo
turned by its EXIF tag gets the mask of the photo as shown."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from mcis_cli import engine, predict, tracking
from mcis_cli.config import load_config
from mcis_cli.stages import export
from tests.photos import photos
from tests.test_deploy import segmenter

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "sky", "stone", "leaf"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A per-pixel (1x1 convolution) segmenter: fast at photo size, and its masks follow the
    photo's content, so a turned photo's mask can be told from an unturned one's."""
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save(segmenter(CLASSES), path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, int]]]:
    return photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def predicted(model, pictures, tmp_path_factory) -> dict[str, np.ndarray]:
    """`mcis predict`'s masks, by photo name."""
    out = tmp_path_factory.mktemp("predicted")
    result = predict.predict_files(model, [str(path) for path, _ in pictures.values()], out, provider="cpu")
    assert result.written == len(pictures) and not result.failed
    for path, _ in pictures.values():  # the overlay is the photo as shown, under its mask
        assert Image.open(out / f"{path.stem}_overlay.jpg").size == Image.open(out / f"{path.stem}.png").size
    return {name: np.asarray(Image.open(out / f"{path.stem}.png")) for name, (path, _) in pictures.items()}


def test_every_mask_has_the_displayed_size(pictures, predicted):
    assert set(pictures) == {"china", "flower", "grace_hopper", "rotated", "grey", "cmyk", "sixteen", "palette"}
    for name, (_, size) in pictures.items():
        assert predicted[name].shape == size, name
        assert len(np.unique(predicted[name])) > 1, name  # a mask of the content, not a constant


def test_an_exif_turned_photo_gets_the_mask_of_the_photo_as_shown(predicted):
    shown, turned = predicted["china"], predicted["rotated"]
    agree = (turned == shown).mean()
    assert agree > 0.95  # JPEG re-encoding moves a few boundary pixels
    assert (turned == shown[::-1, ::-1]).mean() < agree - 0.2  # turned the wrong way round: far off


def test_the_served_model_gives_predicts_masks(store, model, pictures, predicted):
    """The registered model loaded in process (what `mlflow models serve` runs): base64 PNG
    masks by default, nested lists on request, both equal to `mcis predict`'s files."""
    cfg = load_config(REPO / "configs" / "toy.yaml", [f"output_dir={store / 'runs'}", "name=photos"])
    with engine.stage_run(cfg, "export") as tracker:
        info = tracking.log_serving_model(tracker, model, "model", export.example_png(), None, cfg.export)
    served = mlflow.pyfunc.load_model(info.model_uri)
    names = list(pictures)
    rows = served.predict(pd.DataFrame({"image": [pictures[name][0].read_bytes() for name in names]}))
    assert list(rows.columns) == ["mask_png"]
    for name, encoded in zip(names, rows["mask_png"], strict=True):
        png = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert (png.format, png.mode) == ("PNG", "P")
        np.testing.assert_array_equal(np.asarray(png), predicted[name], err_msg=name)
    lists = served.predict(pd.DataFrame({"image": [pictures["rotated"][0].read_bytes()]}),
                           params={"format": "lists"})
    np.testing.assert_array_equal(np.asarray(lists["mask"][0], np.uint8), predicted["rotated"])
