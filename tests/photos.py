"""Real photographs for the tests: the ones installed packages ship (scikit-learn's china.jpg and
flower.jpg, matplotlib's grace_hopper.jpg), and copies of one in every form a camera or an editor
writes: turned by an EXIF tag, greyscale, CMYK, 16-bit and palette.

Each comes with the size a viewer shows it at, which is the size its mask must have.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcis_cli.data.transforms import ORIENTATION

SHIPPED = {
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def shipped(name: str) -> Path:
    """The photograph `name` inside its package (found without importing the package)."""
    package, relative = SHIPPED[name]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip(f"{package} with {relative} is not installed (pip install -e '.[dev]')")
    return path


def photos(folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """name -> (file, (h, w) as displayed): the shipped photographs, and copies of china.jpg
    written into `folder`."""
    found = {name: shipped(name) for name in SHIPPED}
    found = {name: (path, Image.open(path).size[::-1]) for name, path in found.items()}
    image = Image.open(found["china"][0]).convert("RGB")
    size = found["china"][1]
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "turn me a quarter clockwise": the pixels are stored turned the other way
    copies = {
        "rotated.jpg": (image.transpose(Image.Transpose.ROTATE_90), {"quality": 95, "exif": exif}),
        "grey.jpg": (image.convert("L"), {"quality": 95}),
        "cmyk.jpg": (image.convert("CMYK"), {"quality": 95}),
        "sixteen.png": (Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257), {}),
        "palette.png": (image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), {}),
    }
    for file, (copy, options) in copies.items():
        copy.save(folder / file, **options)
        found[Path(file).stem] = (folder / file, size)
    modes = {name: Image.open(path).mode for name, (path, _) in found.items()}
    assert (modes["grey"], modes["cmyk"], modes["sixteen"], modes["palette"]) == ("L", "CMYK", "I;16", "P")
    assert Image.open(found["rotated"][0]).size == size  # stored (w, h) = displayed (h, w)
    return found
