"""The embedded dataset: a small VOC-layout tree on which weak supervision is a real problem.

Every object is a large textured body plus one small coloured part. Classes come in families
whose bodies are drawn from the same distribution (shape, texture, hue), so within a family only
the part tells classes apart: the classifier has to find a few pixels of colour, and nothing in
its loss asks it to cover the rest of the object. The body is consistent within a class, so
co-attention between two images of one class has a whole object to agree on. Backgrounds are muted
and cluttered; objects are saturated, so an image-only saliency method mostly finds them.

Rendering is analytic (4x4 supersampled coverage) with numpy; files are written with Pillow.
Each image draws from its own generator seeded by (seed, split, index), so a tree is
byte-identical for a seed and the first images do not change when more are asked for.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mcis_cli.data.transforms import palette_image
from mcis_cli.errors import McisError
from mcis_cli.files import exclusive_file, umask

VERSION = 1
MARKER = "mcis synthetic dataset"  # first line of README.md: lets force=True recognise its own tree
JPEG_QUALITY = 90
SS = 4  # supersampling per axis for anti-aliased coverage
WEB_NOISE = 0.25  # share of web images whose listed class is absent from the image

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]  # local (u, v) -> inside (bool)


@dataclass(frozen=True)
class Family:
    body: Field  # in units of the semi-axes (a, b)
    texture: Callable[[np.ndarray, np.ndarray], np.ndarray]  # local px coords -> 0..1 shade
    hue: float


@dataclass(frozen=True)
class ObjectClass:
    name: str
    family: Family
    part: Field  # in units of the part radius
    colour: tuple[int, int, int]


def _spots(u, v):
    return (np.sin(u * 0.9) * np.sin(v * 0.9) > 0.35).astype(np.float32)


def _stripes(u, v):
    return (np.sin(u * 1.1) > 0).astype(np.float32)


def _checker(u, v):
    return (np.sin(u * 0.8) * np.sin(v * 0.8) > 0).astype(np.float32)


def _ellipse(u, v):
    return u**2 + v**2 <= 1


def _rounded_box(u, v):
    return (u * u) ** 2 + (v * v) ** 2 <= 1


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.75


def _star(u, v):
    return np.hypot(u, v) <= 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u))


def _ring(u, v):
    return np.abs(np.hypot(u, v) - 0.72) <= 0.28


def _cross(u, v):
    return (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 1)


def _triangle(u, v):
    return (v >= -0.5) & (np.sqrt(3) * np.abs(u) + v <= 1)


def _dot(u, v):
    return np.hypot(u, v) <= 0.8


def _bar(u, v):
    return (np.abs(u) <= 1) & (np.abs(v) <= 0.38)


POD = Family(_ellipse, _spots, hue=0.08)  # orange spotted ellipses
CRATE = Family(_rounded_box, _stripes, hue=0.46)  # teal striped rounded boxes
KITE = Family(_diamond, _checker, hue=0.76)  # violet checkered diamonds
CLASSES = (
    ObjectClass("pod_star", POD, _star, (255, 225, 0)),
    ObjectClass("pod_ring", POD, _ring, (30, 80, 255)),
    ObjectClass("pod_cross", POD, _cross, (250, 250, 250)),
    ObjectClass("crate_tri", CRATE, _triangle, (255, 40, 40)),
    ObjectClass("crate_square", CRATE, _square, (235, 0, 235)),
    ObjectClass("crate_dot", CRATE, _dot, (110, 255, 40)),
    ObjectClass("kite_bar", KITE, _bar, (0, 235, 235)),
    ObjectClass("kite_diamond", KITE, _diamond, (20, 20, 20)),
)
CLASS_NAMES = [c.name for c in CLASSES]


# ---- rendering --------------------------------------------------------------------------
@dataclass
class Layer:
    top: int
    left: int
    alpha: np.ndarray  # coverage 0..1 in the layer's box
    colour: np.ndarray  # HxWx3 float in the box
    label: int  # mask value: class + 1, or 0 for background occluders
    instance: int  # object index, -1 for occluders


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _grid(top: int, left: int, h: int, w: int, cx: float, cy: float, angle: float, step: float):
    """Local coordinates (rotated about (cx, cy)) of a box sampled every `step` pixels."""
    y = (top - cy + (np.arange(round(h / step), dtype=np.float32) + 0.5) * step)[:, None]
    x = (left - cx + (np.arange(round(w / step), dtype=np.float32) + 0.5) * step)[None, :]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return c * x + s * y, c * y - s * x


def _coverage(shape: Field, radii: tuple[float, float], box, centre, angle) -> np.ndarray:
    """Fraction of each pixel of `box` inside the unit shape stretched to `radii`, from SS x SS samples."""
    top, left, h, w = box
    u, v = _grid(top, left, h, w, *centre, angle, 1 / SS)
    inside = shape(u / radii[0], v / radii[1])
    return inside.astype(np.float32).reshape(h, SS, w, SS).mean(axis=(1, 3))


def _box(cx: float, cy: float, radius: float, size: int) -> tuple[int, int, int, int] | None:
    top, left = max(0, int(cy - radius) - 1), max(0, int(cx - radius) - 1)
    bottom, right = min(size, int(cy + radius) + 2), min(size, int(cx + radius) + 2)
    return (top, left, bottom - top, right - left) if bottom > top and right > left else None


def _solid(box, alpha: np.ndarray, colour: np.ndarray, label: int, instance: int) -> Layer:
    return Layer(box[0], box[1], alpha, np.broadcast_to(colour, (*alpha.shape, 3)), label, instance)


def _object(rng: np.random.Generator, cls: int, size: int, instance: int) -> list[Layer]:
    """Body and part layers of one object, placed at random with random pose and colours."""
    spec, scale = CLASSES[cls], size / 96
    a = rng.uniform(11, 20) * scale
    b = a * rng.uniform(0.6, 0.85)
    cx, cy = rng.uniform(0.15, 0.85, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    box = _box(cx, cy, a * 1.05, size)
    body = _coverage(spec.family.body, (a, b), box, (cx, cy), angle)
    u, v = _grid(*box, cx, cy, angle, 1)
    base = _hsv(
        spec.family.hue + rng.uniform(-0.03, 0.03), rng.uniform(0.55, 0.85), rng.uniform(0.6, 0.9)
    )
    shade = 1 - rng.uniform(0.3, 0.45) * spec.family.texture(
        u + rng.uniform(0, 7), v + rng.uniform(0, 7)
    )
    layers = [Layer(box[0], box[1], body, shade[..., None] * base, cls + 1, instance)]

    r = a * rng.uniform(0.26, 0.32)
    c, s = np.cos(angle), np.sin(angle)
    pu, pv = a * rng.uniform(0.45, 0.6), b * rng.uniform(-0.2, 0.2)  # near the body's "head"
    px, py = cx + c * pu - s * pv, cy + s * pu + c * pv
    part_angle = rng.uniform(0, 2 * np.pi)
    part_box = _box(px, py, r * 1.05, size)
    if part_box is not None:
        alpha = _coverage(spec.part, (r, r), part_box, (px, py), part_angle)
        colour = np.clip(np.array(spec.colour, np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        layers.append(_solid(part_box, alpha, colour, cls + 1, instance))
    return layers


def _clutter(rng: np.random.Generator, size: int) -> Layer:
    """A gray-ish ellipse or bar: background when behind objects, an occluder in front."""
    long, short = rng.uniform(4, 22) * size / 96, rng.uniform(1, 6) * size / 96
    cx, cy = rng.uniform(0, size, 2)
    box = _box(cx, cy, long, size)
    shape = _ellipse if rng.random() < 0.5 else _bar
    alpha = _coverage(shape, (long, short), box, (cx, cy), rng.uniform(0, np.pi))
    colour = _hsv(rng.uniform(), rng.uniform(0, 0.2), rng.uniform(0.25, 0.8))
    return _solid(box, alpha, colour, 0, -1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, low-saturation canvas with smooth colour variation and grain."""
    base = _hsv(rng.uniform(), rng.uniform(0.05, 0.25), rng.uniform(0.35, 0.7))
    coarse = rng.uniform(-30, 30, size=(5, 5, 3)).astype(np.float32)
    smooth = [
        Image.fromarray(coarse[..., i]).resize((size, size), Image.Resampling.BICUBIC)
        for i in range(3)
    ]
    grain = rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
    return base + np.stack([np.asarray(x) for x in smooth], axis=-1) + grain


def _composite(
    canvas: np.ndarray, layers: list[Layer]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint layers in order; returns the image, the mask (255 on anti-aliased object edges) and
    the instance map. Edges between equal labels (part on body, clutter on background) stay clean."""
    size = canvas.shape[0]
    label = np.zeros((size, size), np.uint8)
    instance = np.full((size, size), -1, np.int16)
    soft = np.zeros((size, size), bool)
    for layer in layers:
        h, w = layer.alpha.shape
        window = np.s_[layer.top : layer.top + h, layer.left : layer.left + w]
        alpha = layer.alpha
        canvas[window] = canvas[window] * (1 - alpha[..., None]) + layer.colour * alpha[..., None]
        mixed = (alpha > 0.02) & (alpha < 0.98) & (label[window] != layer.label)
        soft[window] &= alpha < 0.98
        soft[window] |= mixed
        label[window] = np.where(alpha >= 0.5, layer.label, label[window])
        instance[window] = np.where(alpha >= 0.5, layer.instance, instance[window])
    mask = np.where(soft, 255, label).astype(np.uint8)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mask, instance


def render(rng: np.random.Generator, classes: list[int], size: int, clutter: int, occluder: bool):
    """One image holding one object per entry of `classes`: (image, mask).

    Layouts are redrawn until every object keeps at least half its area and half its part.
    """
    for _ in range(50):
        canvas = _background(rng, size)
        layers = [_clutter(rng, size) for _ in range(clutter)]
        objects = [_object(rng, c, size, i) for i, c in enumerate(classes)]
        layers += [layer for obj in objects for layer in obj]
        if occluder and rng.random() < 0.5:
            layers.append(_clutter(rng, size))
        image, mask, instance = _composite(canvas, layers)
        if all(_visible(obj, instance, i) for i, obj in enumerate(objects)):
            return image, mask
    raise RuntimeError("could not place objects without hiding one; lower the object count")


def _visible(obj: list[Layer], instance: np.ndarray, index: int) -> bool:
    """At least half of the body and of the part still show (instance map after painting)."""
    for layer in obj:
        h, w = layer.alpha.shape
        own = layer.alpha >= 0.5
        shown = instance[layer.top : layer.top + h, layer.left : layer.left + w] == index
        if own.sum() == 0 or (own & shown).sum() < 0.5 * own.sum():
            return False
    return True


# ---- the tree ---------------------------------------------------------------------------
def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


def _scene_classes(rng: np.random.Generator) -> list[int]:
    count = rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])
    return [int(c) for c in rng.integers(0, len(CLASSES), size=count)]


def _write_split(root: Path, split: str, code: int, n: int, seed: int, size: int) -> list[str]:
    """VOC images + masks; returns `<id> <c> ...` label lines (0-based)."""
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, code, i])
        classes = _scene_classes(rng)
        image, mask = render(rng, classes, size, clutter=int(rng.integers(3, 9)), occluder=True)
        image_id = f"{split}_{i:05d}"
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
        palette_image(mask).save(root / "SegmentationClassAug" / f"{image_id}.png", format="PNG")
        lines.append(" ".join([image_id, *map(str, sorted(set(classes)))]))
    return lines


def _write_extra(root: Path, n: int, seed: int, size: int) -> list[str]:
    """Setting 2: simple single-object images, `<file> <class>` lines with 1-based classes."""
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        cls = int(rng.integers(0, len(CLASSES)))
        image, _ = render(rng, [cls], size, clutter=int(rng.integers(0, 3)), occluder=False)
        _save_jpeg(root / "extra" / f"extra_{i:05d}.jpg", image)
        lines.append(f"extra/extra_{i:05d}.jpg {cls + 1}")
    return lines


def _write_web(root: Path, n: int, seed: int, size: int) -> tuple[list[str], int]:
    """Setting 3: noisy web images. Each is listed under one query class; about WEB_NOISE of them
    do not hold it (a sibling of the same family, or any class), and other objects go unlisted."""
    lines, wrong = [], 0
    for i in range(n):
        rng = np.random.default_rng([seed, 3, i])
        query = int(rng.integers(0, len(CLASSES)))
        classes = _scene_classes(rng)[:2]
        if rng.random() < WEB_NOISE:
            others = [c for c in range(len(CLASSES)) if c != query]
            siblings = [c for c in others if CLASSES[c].family is CLASSES[query].family]
            classes = [c if c != query else int(rng.choice(others)) for c in classes]
            classes[0] = int(rng.choice(siblings if rng.random() < 0.6 else others))
        else:
            classes[0] = query
        wrong += query not in classes
        image, _ = render(rng, classes, size, clutter=int(rng.integers(3, 9)), occluder=True)
        _save_jpeg(root / "web" / f"web_{i:05d}.jpg", image)
        lines.append(f"web/web_{i:05d}.jpg {query + 1}")
    return lines, wrong


def _readme(seed: int, sizes: dict[str, int], size: int, web_wrong: int) -> str:
    """What was written and how to write it again."""
    classes = "\n".join(
        f"{i:2d}  {c.name:14s} part colour {c.colour}" for i, c in enumerate(CLASSES)
    )
    counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
    options = " ".join(f"--n-{k} {v}" for k, v in sizes.items())
    return (
        f"{MARKER}, generator version {VERSION}\n\n"
        f"{counts} images of {size}x{size} px, written by\n"
        f"`mcis data synth --seed {seed} --size {size} {options}`.\n"
        "Layout: JPEGImages/, SegmentationClassAug/ (palette PNG: 0 background, class+1, 255 on\n"
        "object edges), ImageSets/Segmentation/{train_aug,val}.txt and {train,val}_cls.txt\n"
        "(0-based labels); extra.txt / web.txt list `<file> <class>` with 1-based classes.\n"
        f"Web images whose listed class is absent: {web_wrong} of {sizes.get('web', 0)}.\n\n"
        "Each object = a body shared by its family (pod: orange spotted ellipse, crate: teal striped\n"
        "box, kite: violet checkered diamond) + a small part whose shape and colour name the class.\n\n"
        f"Classes (0-based):\n{classes}\n"
    )


def write(
    out: str | Path,
    seed: int = 0,
    n_train: int = 320,
    n_val: int = 80,
    size: int = 96,
    n_extra: int = 0,
    n_web: int = 0,
    force: bool = False,
) -> dict:
    """Write the embedded dataset to `out` (VOC2012 layout). Deterministic for a seed.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted
    run leaves nothing half-written, under a lock beside it, so a second writer is refused. An
    existing non-empty `out` is replaced only with force=True, and only when it is a tree this
    function wrote (its README.md starts with the marker).
    """
    out = Path(out)
    if min(n_train, n_val) < 1 or min(n_extra, n_web) < 0 or size < 32:
        raise McisError("synth needs n_train >= 1, n_val >= 1, n_extra/n_web >= 0 and size >= 32")
    with exclusive_file(out, "--out folder"):
        return _write(out, seed, n_train, n_val, size, n_extra, n_web, force)


def _write(out: Path, seed: int, n_train: int, n_val: int, size: int, n_extra: int, n_web: int,
           force: bool) -> dict:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise McisError(f"{out} exists and is not empty; pass --force to replace it")
        readme = out / "README.md"
        if not (readme.is_file() and readme.read_text().startswith(MARKER)):
            raise McisError(f"{out} was not written by `mcis data synth`; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lists = tmp / "ImageSets" / "Segmentation"
        for folder in (tmp / "JPEGImages", tmp / "SegmentationClassAug", lists):
            folder.mkdir(parents=True)
        train = _write_split(tmp, "train", 0, n_train, seed, size)
        val = _write_split(tmp, "val", 1, n_val, seed, size)
        web, web_wrong = _write_web(tmp, n_web, seed, size)
        files = {
            "train_aug": [line.split()[0] for line in train],
            "train_cls": train,
            "val": [line.split()[0] for line in val],
            "val_cls": val,
            "extra": _write_extra(tmp, n_extra, seed, size),
            "web": web,
        }
        for name, lines in files.items():
            if lines:
                (lists / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        sizes = {"train": n_train, "val": n_val, "extra": n_extra, "web": n_web}
        (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
        (tmp / "README.md").write_text(_readme(seed, sizes, size, web_wrong))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": sum(sizes.values()), **sizes, "web_wrong": web_wrong, "classes": CLASS_NAMES}
