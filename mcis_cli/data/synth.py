"""The embedded dataset: a small VOC-layout tree on which weak supervision is a real problem.

Every object is a large textured body plus one small coloured part. Classes come in families
whose bodies are drawn from the same distribution (shape, texture, hue), so within a family only
the part tells classes apart: the classifier has to find a few pixels of colour, and nothing in
its loss asks it to cover the rest of the object. The body is consistent within a class, so
co-attention between two images of one class has a whole object to agree on.

Version 2 adds what real data has beside that. Shared context: most images are drawn on the
habitat of their first object's family (grass, sand, sky: boats on water), a canvas more saturated
than the muted one, so context co-occurs with classes and the computed saliency is good but not
perfect. Co-occurrence: a scene's further objects are mostly its first object's companion class,
from another family (people with horses). Each image also gets a part map (0 background, 1 body,
2 part), so where a localization map falls, the part or the whole object, is measured
(`metrics.hot_region_counts`), not assumed. What was measured is in docs/dataset.md.

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

from mcis_cli.data import voc
from mcis_cli.data.transforms import palette_image
from mcis_cli.data.voc import VOC_CLASSES as VOC_NAMES
from mcis_cli.errors import McisError
from mcis_cli.files import exclusive_file, umask

VERSION = 2
MARKER = "mcis synthetic dataset"  # first line of README.md: lets force=True recognise its own tree
JPEG_QUALITY = 90
SS = 4  # supersampling per axis for anti-aliased coverage
WEB_NOISE = 0.25  # share of web images whose listed class is absent from the image
BODY_SIZE = (11.0, 20.0)  # the body's long semi-axis in px of a 96 px image
CONTEXT = 0.7  # share of images drawn on the habitat of their first object's family
COMPANION = 0.6  # chance that a further object of a scene is the first one's companion class
BACKGROUND, BODY, PART = 0, 1, 2  # values of the part maps (voc.PARTS), for measuring maps only

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]  # local (u, v) -> inside (bool)


@dataclass(frozen=True)
class Habitat:
    """A family's usual surroundings (boats on water): a hue band and a texture of the canvas."""

    hue: float
    saturation: tuple[float, float]
    value: tuple[float, float]
    texture: Callable[[np.ndarray, np.ndarray], np.ndarray]  # image px coords -> -1..1


@dataclass(frozen=True)
class Family:
    body: Field  # in units of the semi-axes (a, b)
    texture: Callable[[np.ndarray, np.ndarray], np.ndarray]  # local px coords -> 0..1 shade
    hue: float
    habitat: Habitat


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


def _blades(x, y):
    return np.sin(x * 1.7 + 2 * np.sin(y * 0.21)) * np.sin(y * 0.33)


def _ripples(x, y):
    return np.sin(y * 0.9 + 1.5 * np.sin(x * 0.15))


def _haze(x, y):
    return np.sin(x * 0.05 + y * 0.03)


def _dunes(x, y):
    return np.sin((x + 2 * y) * 0.12)


GRASS = Habitat(0.30, (0.30, 0.45), (0.35, 0.55), _blades)
SAND = Habitat(0.12, (0.25, 0.40), (0.55, 0.75), _dunes)
SKY = Habitat(0.58, (0.20, 0.35), (0.70, 0.90), _haze)
WATER = Habitat(0.52, (0.30, 0.45), (0.35, 0.55), _ripples)
POD = Family(_ellipse, _spots, hue=0.08, habitat=GRASS)  # orange spotted ellipses, in grass
CRATE = Family(_rounded_box, _stripes, hue=0.46, habitat=SAND)  # teal striped rounded boxes, on sand
KITE = Family(_diamond, _checker, hue=0.76, habitat=SKY)  # violet checkered diamonds, in the sky
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
PARTS = (_star, _ring, _cross, _triangle, _square, _dot, _bar, _diamond)
DART = Family(_triangle, _stripes, hue=0.6, habitat=WATER)  # a fourth family for VOC's 20: blue striped triangles
# The VOC profile's classes: VOC's names in VOC order; class i is a body of family i // 5 with
# part shape i % 8 in its own colour (hues 0.382 turns apart).
VOC_CLASSES = tuple(
    ObjectClass(name, (POD, CRATE, KITE, DART)[i // 5], PARTS[i % 8],
                tuple(int(c) for c in colorsys.hsv_to_rgb((i * 0.382) % 1, 0.9 - 0.3 * (i % 2), 255)))
    for i, name in enumerate(VOC_NAMES)
)


# ---- rendering --------------------------------------------------------------------------
@dataclass
class Layer:
    top: int
    left: int
    alpha: np.ndarray  # coverage 0..1 in the layer's box
    colour: np.ndarray  # HxWx3 float in the box
    label: int  # mask value: class + 1, or 0 for background occluders
    instance: int  # object index, -1 for occluders
    kind: int = BACKGROUND  # what the part map says under it: BACKGROUND, BODY or PART


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


def _box(cx: float, cy: float, radius: float, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    top, left = max(0, int(cy - radius) - 1), max(0, int(cx - radius) - 1)
    bottom, right = min(shape[0], int(cy + radius) + 2), min(shape[1], int(cx + radius) + 2)
    return (top, left, bottom - top, right - left) if bottom > top and right > left else None


def _solid(box, alpha: np.ndarray, colour: np.ndarray, label: int, instance: int, kind: int = BACKGROUND) -> Layer:
    return Layer(box[0], box[1], alpha, np.broadcast_to(colour, (*alpha.shape, 3)), label, instance, kind)


def _object(rng: np.random.Generator, cls: int, shape: tuple[int, int], instance: int,
            table: tuple[ObjectClass, ...] = CLASSES) -> list[Layer]:
    """Body and part layers of object class `table[cls]` in an image of (h, w) `shape`, placed at
    random with random pose and colours; sizes scale with the short side (96 px: the toy's)."""
    spec, scale = table[cls], min(shape) / 96
    a = rng.uniform(*BODY_SIZE) * scale
    b = a * rng.uniform(0.6, 0.85)
    cx, cy = rng.uniform(0.15, 0.85, size=2) * shape[::-1]
    angle = rng.uniform(0, 2 * np.pi)
    box = _box(cx, cy, a * 1.05, shape)
    body = _coverage(spec.family.body, (a, b), box, (cx, cy), angle)
    u, v = _grid(*box, cx, cy, angle, 1)
    base = _hsv(
        spec.family.hue + rng.uniform(-0.03, 0.03), rng.uniform(0.55, 0.85), rng.uniform(0.6, 0.9)
    )
    shade = 1 - rng.uniform(0.3, 0.45) * spec.family.texture(
        u + rng.uniform(0, 7), v + rng.uniform(0, 7)
    )
    layers = [Layer(box[0], box[1], body, shade[..., None] * base, cls + 1, instance, BODY)]

    r = a * rng.uniform(0.34, 0.40)  # about one cell of the classifier's stride-8 features
    c, s = np.cos(angle), np.sin(angle)
    pu, pv = a * rng.uniform(0.45, 0.6), b * rng.uniform(-0.2, 0.2)  # near the body's "head"
    px, py = cx + c * pu - s * pv, cy + s * pu + c * pv
    part_angle = rng.uniform(0, 2 * np.pi)
    part_box = _box(px, py, r * 1.05, shape)
    if part_box is not None:
        alpha = _coverage(spec.part, (r, r), part_box, (px, py), part_angle)
        colour = np.clip(np.array(spec.colour, np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        layers.append(_solid(part_box, alpha, colour, cls + 1, instance, PART))
    return layers


def _clutter(rng: np.random.Generator, shape: tuple[int, int]) -> Layer:
    """A gray-ish ellipse or bar: background when behind objects, an occluder in front."""
    long, short = rng.uniform(4, 22) * min(shape) / 96, rng.uniform(1, 6) * min(shape) / 96
    cx, cy = rng.uniform(0, shape[::-1])
    box = _box(cx, cy, long, shape)
    shape = _ellipse if rng.random() < 0.5 else _bar
    alpha = _coverage(shape, (long, short), box, (cx, cy), rng.uniform(0, np.pi))
    colour = _hsv(rng.uniform(), rng.uniform(0, 0.2), rng.uniform(0.25, 0.8))
    return _solid(box, alpha, colour, 0, -1)


def _background(rng: np.random.Generator, shape: tuple[int, int], habitat: Habitat | None) -> np.ndarray:
    """A canvas with smooth colour variation and grain: muted and of any hue, or a habitat's
    textured band, more saturated (a harder case for saliency)."""
    if habitat is None:
        base = _hsv(rng.uniform(), rng.uniform(0.05, 0.25), rng.uniform(0.35, 0.7))
    else:
        base = _hsv(habitat.hue + rng.uniform(-0.03, 0.03), rng.uniform(*habitat.saturation),
                    rng.uniform(*habitat.value))
        y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float32) * (96 / min(shape))
        base = base * (1 + 0.12 * habitat.texture(x + rng.uniform(0, 50), y + rng.uniform(0, 50)))[..., None]
    coarse = rng.uniform(-30, 30, size=(5, 5, 3)).astype(np.float32)
    smooth = [
        Image.fromarray(coarse[..., i]).resize(shape[::-1], Image.Resampling.BICUBIC)
        for i in range(3)
    ]
    grain = rng.normal(0, 6, size=(*shape, 3)).astype(np.float32)
    return base + np.stack([np.asarray(x) for x in smooth], axis=-1) + grain


def _composite(
    canvas: np.ndarray, layers: list[Layer]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paint layers in order; returns the image, the mask (255 on anti-aliased object edges), the
    instance map and the part map. Edges between equal labels (part on body, clutter on
    background) stay clean."""
    shape = canvas.shape[:2]
    label = np.zeros(shape, np.uint8)
    kind = np.zeros(shape, np.uint8)
    instance = np.full(shape, -1, np.int16)
    soft = np.zeros(shape, bool)
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
        kind[window] = np.where(alpha >= 0.5, layer.kind, kind[window])
    mask = np.where(soft, 255, label).astype(np.uint8)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mask, instance, kind


def scene_habitat(rng: np.random.Generator, classes: list[int], table: tuple[ObjectClass, ...]) -> Habitat | None:
    """The first object's habitat with probability CONTEXT, else None (a muted canvas of any hue)."""
    return table[classes[0]].family.habitat if rng.random() < CONTEXT else None


def render(rng: np.random.Generator, classes: list[int], shape: tuple[int, int], clutter: int, occluder: bool,
           table: tuple[ObjectClass, ...] = CLASSES):
    """One (h, w) `shape` image holding one object of `table` per entry of `classes`: (image,
    mask, part map). With probability CONTEXT the canvas is the first object's habitat.

    Layouts are redrawn until every object keeps at least half its area and half its part.
    """
    habitat = scene_habitat(rng, classes, table)
    for _ in range(50):
        canvas = _background(rng, shape, habitat)
        layers = [_clutter(rng, shape) for _ in range(clutter)]
        objects = [_object(rng, c, shape, i, table) for i, c in enumerate(classes)]
        layers += [layer for obj in objects for layer in obj]
        if occluder and rng.random() < 0.5:
            layers.append(_clutter(rng, shape))
        image, mask, instance, parts = _composite(canvas, layers)
        if all(_visible(obj, instance, i) for i, obj in enumerate(objects)):
            return image, mask, parts
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


# ---- profiles ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """What a tree looks like: its classes, its image shapes and the background cue it ships."""

    name: str
    classes: tuple[ObjectClass, ...]
    shapes: tuple[tuple[int, int], ...] = ()  # (h, w) drawn per image with `weights`; (): size x size
    weights: tuple[float, ...] = ()
    saliency_dir: str | None = None  # 0/255 saliency PNGs (object pixels) of the training images
    class_file: bool = True  # classes.txt; without it the tree reads as VOC (voc.class_names)

    def shape(self, rng: np.random.Generator, size: int) -> tuple[int, int]:
        """The next image's (h, w); the toy profile draws nothing, so its trees stay as they were."""
        return self.shapes[rng.choice(len(self.shapes), p=self.weights)] if self.shapes else (size, size)


TOY = Profile("toy", CLASSES)
# PASCAL VOC 2012's usual JPEG sizes (h, w): 500 px on the long side, most 500 x 375 landscape,
# some portrait (375 x 500, 333 x 500 as w x h); saliency maps where configs/voc12_vgg16.yaml
# reads them, and no classes.txt, so that the VOC configs run on the tree unchanged but for data.root.
VOC = Profile(
    "voc", VOC_CLASSES,
    shapes=((375, 500), (333, 500), (500, 375), (500, 333), (334, 500), (366, 500), (281, 500), (500, 500)),
    weights=(0.40, 0.15, 0.15, 0.08, 0.08, 0.06, 0.04, 0.04),
    saliency_dir="saliency_aug", class_file=False,
)
PROFILES = {p.name: p for p in (TOY, VOC)}


# ---- the tree ---------------------------------------------------------------------------
def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=False)


def _save_saliency(root: Path, profile: Profile, image_id: str, mask: np.ndarray) -> None:
    """A perfect binary saliency map (255 on every object pixel, edges included), as near-binary
    as the DSS maps the official code reads; nothing for a profile without one."""
    if profile.saliency_dir is not None:
        folder = root / profile.saliency_dir
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.uint8(255) * (mask > 0).astype(np.uint8)).save(folder / f"{image_id}.png", format="PNG")


def companion(cls: int, k: int) -> int:
    """The class that class `cls` mostly appears with (as people with horses): one of another
    family, half the class list away (families are consecutive runs of classes)."""
    return (cls + k // 2) % k


def _scene_classes(rng: np.random.Generator, k: int) -> list[int]:
    """1-3 objects; the first of any class, each further one its companion with probability COMPANION."""
    count = rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])
    first = int(rng.integers(0, k))
    return [first, *(companion(first, k) if rng.random() < COMPANION else int(rng.integers(0, k))
                     for _ in range(count - 1))]


def _write_split(root: Path, split: str, code: int, n: int, seed: int, size: int, profile: Profile) -> list[str]:
    """VOC images + masks (and the training images' saliency); returns `<id> <c> ...` label lines (0-based)."""
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, code, i])
        shape = profile.shape(rng, size)
        classes = _scene_classes(rng, len(profile.classes))
        image, mask, parts = render(rng, classes, shape, int(rng.integers(3, 9)), True, profile.classes)
        image_id = f"{split}_{i:05d}"
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", image)
        palette_image(mask).save(root / "SegmentationClassAug" / f"{image_id}.png", format="PNG")
        Image.fromarray(parts).save(root / voc.PARTS / f"{image_id}.png", format="PNG")
        if split == "train":
            _save_saliency(root, profile, image_id, mask)
        lines.append(" ".join([image_id, *map(str, sorted(set(classes)))]))
    return lines


def _write_extra(root: Path, n: int, seed: int, size: int, profile: Profile) -> list[str]:
    """Setting 2: simple single-object images, `<file> <class>` lines with 1-based classes."""
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        shape = profile.shape(rng, size)
        cls = int(rng.integers(0, len(profile.classes)))
        image, mask, _ = render(rng, [cls], shape, int(rng.integers(0, 3)), False, profile.classes)
        _save_jpeg(root / "extra" / f"extra_{i:05d}.jpg", image)
        _save_saliency(root, profile, f"extra_extra_{i:05d}", mask)  # voc.py's id: <list>_<stem>
        lines.append(f"extra/extra_{i:05d}.jpg {cls + 1}")
    return lines


def _write_web(root: Path, n: int, seed: int, size: int, profile: Profile) -> tuple[list[str], int]:
    """Setting 3: noisy web images. Each is listed under one query class; about WEB_NOISE of them
    do not hold it (a sibling of the same family, or any class), and other objects go unlisted."""
    lines, wrong, table = [], 0, profile.classes
    for i in range(n):
        rng = np.random.default_rng([seed, 3, i])
        shape = profile.shape(rng, size)
        query = int(rng.integers(0, len(table)))
        classes = _scene_classes(rng, len(table))[:2]
        if rng.random() < WEB_NOISE:
            others = [c for c in range(len(table)) if c != query]
            siblings = [c for c in others if table[c].family is table[query].family]
            classes = [c if c != query else int(rng.choice(others)) for c in classes]
            classes[0] = int(rng.choice(siblings if rng.random() < 0.6 else others))
        else:
            classes[0] = query
        wrong += query not in classes
        image, mask, _ = render(rng, classes, shape, int(rng.integers(3, 9)), True, table)
        _save_jpeg(root / "web" / f"web_{i:05d}.jpg", image)
        _save_saliency(root, profile, f"web_web_{i:05d}", mask)
        lines.append(f"web/web_{i:05d}.jpg {query + 1}")
    return lines, wrong


def _readme(seed: int, sizes: dict[str, int], size: int, web_wrong: int, profile: Profile) -> str:
    """What was written and how to write it again."""
    classes = "\n".join(
        f"{i:2d}  {c.name:14s} part colour {c.colour} ({companion(i, len(profile.classes))})"
        for i, c in enumerate(profile.classes)
    )
    counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
    options = " ".join(f"--n-{k} {v}" for k, v in sizes.items())
    if profile.shapes:
        shapes = ", ".join(f"{w}x{h}" for h, w in profile.shapes)
        what = f"images of PASCAL VOC's sizes (w x h: {shapes})"
        command = f"mcis data synth --profile {profile.name} --seed {seed} {options}"
    else:
        what, command = f"images of {size}x{size} px", f"mcis data synth --seed {seed} --size {size} {options}"
    families = ("pod: orange spotted ellipse in grass, crate: teal\n"
                "striped box on sand, kite: violet checkered diamond in the sky"
                + (", dart: blue striped triangle on water" if profile is VOC else ""))
    cue = (f"{profile.saliency_dir}/ holds binary saliency maps (255 on the objects) of the training\n"
           "images, a perfect stand-in for the DSS maps of the real data.\n" if profile.saliency_dir else "")
    return (
        f"{MARKER}, generator version {VERSION}\n\n"
        f"{counts} {what}, written by\n"
        f"`{command}`.\n"
        "Layout: JPEGImages/, SegmentationClassAug/ (palette PNG: 0 background, class+1, 255 on\n"
        "object edges), ImageSets/Segmentation/{train_aug,val}.txt and {train,val}_cls.txt\n"
        "(0-based labels); extra.txt / web.txt list `<file> <class>` with 1-based classes.\n"
        f"{voc.PARTS}/ (grey PNG: 0 background, 1 body, 2 part) of the train and val images: for\n"
        "measuring where localization maps fall, never for training.\n"
        f"{cue}"
        f"Web images whose listed class is absent: {web_wrong} of {sizes.get('web', 0)}.\n\n"
        f"Each object = a body shared by its family ({families}) + a small part whose shape and colour name the class.\n"
        f"{CONTEXT:.0%} of the images are drawn on the habitat of their first object's family; each further\n"
        f"object is the first one's companion class (another family's) with probability {COMPANION:.0%}.\n"
        "Measured properties (where plain CAM maps fall, the saliency's IoU): docs/dataset.md.\n\n"
        f"Classes (0-based, companion in brackets):\n{classes}\n"
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
    profile: str = "toy",
) -> dict:
    """Write the embedded dataset to `out` (VOC2012 layout). Deterministic for a seed.

    `profile` "toy" is the embedded dataset (8 classes, size x size images); "voc" is shaped as
    PASCAL VOC 2012 for the VOC configs: its 20 class names, its image sizes (`size` unused),
    saliency maps in saliency_aug/.

    The tree is built in a temporary sibling folder and renamed into place, so an interrupted
    run leaves nothing half-written, under a lock beside it, so a second writer is refused. An
    existing non-empty `out` is replaced only with force=True, and only when it is a tree this
    function wrote (its README.md starts with the marker).
    """
    out = Path(out)
    if min(n_train, n_val) < 1 or min(n_extra, n_web) < 0 or size < 32:
        raise McisError("synth needs n_train >= 1, n_val >= 1, n_extra/n_web >= 0 and size >= 32")
    if profile not in PROFILES:
        raise McisError(f"unknown synth profile {profile!r}; choose one of {', '.join(PROFILES)}")
    with exclusive_file(out, "--out folder"):
        return _write(out, seed, n_train, n_val, size, n_extra, n_web, force, PROFILES[profile])


def _write(out: Path, seed: int, n_train: int, n_val: int, size: int, n_extra: int, n_web: int,
           force: bool, profile: Profile) -> dict:
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
        for folder in (tmp / "JPEGImages", tmp / "SegmentationClassAug", tmp / voc.PARTS, lists):
            folder.mkdir(parents=True)
        train = _write_split(tmp, "train", 0, n_train, seed, size, profile)
        val = _write_split(tmp, "val", 1, n_val, seed, size, profile)
        web, web_wrong = _write_web(tmp, n_web, seed, size, profile)
        files = {
            "train_aug": [line.split()[0] for line in train],
            "train_cls": train,
            "val": [line.split()[0] for line in val],
            "val_cls": val,
            "extra": _write_extra(tmp, n_extra, seed, size, profile),
            "web": web,
        }
        for name, lines in files.items():
            if lines:
                (lists / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        sizes = {"train": n_train, "val": n_val, "extra": n_extra, "web": n_web}
        names = [c.name for c in profile.classes]
        if profile.class_file:
            (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in names))
        (tmp / "README.md").write_text(_readme(seed, sizes, size, web_wrong, profile))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": sum(sizes.values()), **sizes, "web_wrong": web_wrong, "classes": names}
