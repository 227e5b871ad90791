"""The embedded dataset: deterministic, valid VOC layout, and built so that weak supervision is hard."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mcis_cli.cli import app
from mcis_cli.config import DataCfg
from mcis_cli.data import synth, transforms, voc
from mcis_cli.errors import McisError

SMALL = {"n_train": 6, "n_val": 3, "size": 48, "n_extra": 2, "n_web": 4}


def _tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_a_byte_identical_tree(tmp_path):
    synth.write(tmp_path / "a", seed=7, **SMALL)
    synth.write(tmp_path / "b", seed=7, **SMALL)
    synth.write(tmp_path / "c", seed=8, **SMALL)
    a = _tree_hash(tmp_path / "a")
    assert a == _tree_hash(tmp_path / "b")
    assert a != _tree_hash(tmp_path / "c")
    assert len(a) == 6 * 3 + 3 * 3 + 2 + 4 + 8  # images, masks, part maps, extra, web, lists/readme/classes
    synth.write(tmp_path / "d", seed=7, **{**SMALL, "n_train": 7})
    d = _tree_hash(tmp_path / "d")
    assert all(d[k] == a[k] for k in a if k.startswith(("JPEGImages/", "SegmentationClassAug/", voc.PARTS)))


def test_toy_tree_content_is_pinned(tmp_path):
    """The masks, part maps, lists and README of a small toy tree as generator version 2 writes
    them (the demo's results depend on them)."""
    root = tmp_path / "toy"
    synth.write(root, seed=7, **SMALL)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix == ".png":
            digest.update(transforms.read_index_png(path).tobytes())
        elif path.suffix in (".txt", ".md"):
            digest.update(path.read_bytes())
    assert digest.hexdigest() == "cea912f7f1b07f0babba22ef013fa49383ce98914e1a79105ea7020e31d88ac7"


def test_voc_profile_is_shaped_as_voc(tmp_path):
    root = tmp_path / "voc"
    report = synth.write(root, profile="voc", n_train=24, n_val=6, n_extra=2, n_web=2)
    assert report["classes"] == list(voc.VOC_CLASSES) == voc.class_names(root)
    assert not (root / "classes.txt").exists()  # read as a real VOC tree: the VOC names, VOC order
    checked = voc.check(root)
    assert checked.problems == [] and checked.classes == list(voc.VOC_CLASSES)
    assert checked.splits["train_aug"].images == checked.splits["train_aug"].masks == 24
    shapes = set()
    for sample in voc.split_samples(root, "train_aug") + voc.split_samples(root, "val"):
        image = transforms.load_image(sample.image)
        mask = voc.load_mask(root, sample.id)
        assert image.shape[:2] == mask.shape and max(mask.shape) == 500
        assert set(np.unique(mask)) <= {0, 255, *range(1, 21)}
        shapes.add(mask.shape)
    assert (375, 500) in shapes and any(h > w for h, w in shapes)  # landscape and portrait
    assert shapes <= set(synth.VOC.shapes)
    cfg = DataCfg(root=str(root), saliency_dir="saliency_aug", extra_lists=["extra", "web"])
    for sample in voc.train_samples(cfg):  # the background cue of voc12_vgg16.yaml, for every training image
        saliency = np.asarray(Image.open(voc.saliency_path(root, "saliency_aug", sample.id)))
        assert saliency.shape == transforms.load_image(sample.image).shape[:2]
        assert set(np.unique(saliency)) <= {0, 255}
    assert not (root / "saliency_aug" / "val_00000.png").exists()


def test_voc_profile_is_deterministic_and_the_size_option_unused(tmp_path):
    synth.write(tmp_path / "a", profile="voc", seed=3, n_train=3, n_val=2)
    synth.write(tmp_path / "b", profile="voc", seed=3, n_train=3, n_val=2, size=64)
    synth.write(tmp_path / "c", profile="voc", seed=4, n_train=3, n_val=2)
    a = _tree_hash(tmp_path / "a")
    assert a == _tree_hash(tmp_path / "b") and a != _tree_hash(tmp_path / "c")
    with pytest.raises(McisError, match="unknown synth profile 'coco'"):
        synth.write(tmp_path / "d", profile="coco", n_train=3, n_val=2)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    out = tmp_path / "toy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(McisError, match="not empty"):
        synth.write(out, **SMALL)
    with pytest.raises(McisError, match="not written by"):
        synth.write(out, force=True, **SMALL)
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    first = synth.write(out, **SMALL)
    second = synth.write(out, seed=1, force=True, **SMALL)
    assert first["images"] == second["images"] == 15
    assert "--seed 1" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temporary folder left


def test_toy_tree_passes_check_and_reads_back(toy_root):
    report = voc.check(toy_root)
    assert report.problems == []
    assert report.classes == synth.CLASS_NAMES == voc.class_names(toy_root)
    assert report.splits["train_aug"].images == report.splits["train_aug"].masks == 48
    assert report.splits["val"].masks == 16 and report.splits["web"].images == 8
    assert all(n > 0 for n in report.splits["train_aug"].per_class)
    samples = voc.train_samples(DataCfg(root=str(toy_root), extra_lists=["extra", "web"]))
    assert len(samples) == 48 + 8 + 8
    assert transforms.load_image(samples[-1].image).shape == (64, 64, 3)


def test_labels_are_the_classes_in_the_masks(toy_root, tmp_path):
    copy = shutil.copytree(toy_root, tmp_path / "copy")
    voc.derive_labels(copy, force=True)
    for name in voc.CLS_FILES:
        assert (copy / voc.LISTS / name).read_text() == (toy_root / voc.LISTS / name).read_text()
    mask = voc.load_mask(toy_root, "train_00000")
    assert (mask == 255).any() and (mask == 0).mean() > 0.4  # an edge band; mostly background


def test_objects_are_a_big_body_with_a_small_part():
    """Bodies are shared within a family; the part, a small share of the object, names the class."""
    families = [spec.family for spec in synth.CLASSES]
    assert all(families.count(family) >= 2 for family in families)
    assert len({spec.colour for spec in synth.CLASSES}) == len(synth.CLASSES)
    for cls in range(len(synth.CLASSES)):
        for i in range(5):
            body, *part = synth._object(np.random.default_rng([cls, i]), cls, (96, 96), 0)
            if part:
                ratio = (part[0].alpha >= 0.5).sum() / (body.alpha >= 0.5).sum()
                assert 0.02 < ratio < 0.25


def test_part_maps_split_each_object_into_body_and_part(toy_root):
    """Every object pixel is body or part, nothing else is; the part is a small share of its object."""
    shares = []
    for sample in voc.split_samples(toy_root, "train_aug"):
        mask, parts = voc.load_mask(toy_root, sample.id), voc.load_parts(toy_root, sample.id)
        assert parts.shape == mask.shape and set(np.unique(parts)) <= {synth.BACKGROUND, synth.BODY, synth.PART}
        inner = mask != 255
        assert ((mask[inner] > 0) == (parts[inner] != synth.BACKGROUND)).all()
        for cls in sample.labels:
            own = mask == cls + 1
            shares.append((own & (parts == synth.PART)).sum() / own.sum())
    assert 0.05 < np.median(shares) < 0.35 and min(shares) > 0  # no object lost its part


def test_scenes_follow_the_configured_co_occurrence():
    """Further objects are the first one's companion (of another family) as often as COMPANION
    says, plus chance; the canvas is the first object's habitat as often as CONTEXT says."""
    k, rng = len(synth.CLASSES), np.random.default_rng(0)
    scenes = [synth._scene_classes(rng, k) for _ in range(6000)]
    further = [(s[0], c) for s in scenes for c in s[1:]]
    rate = np.mean([c == synth.companion(first, k) for first, c in further])
    assert abs(rate - (synth.COMPANION + (1 - synth.COMPANION) / k)) < 0.03
    assert np.mean([len(s) == 1 for s in scenes]) == pytest.approx(0.5, abs=0.03)
    for cls in range(k):
        assert synth.CLASSES[synth.companion(cls, k)].family is not synth.CLASSES[cls].family
    assert all(synth.VOC_CLASSES[synth.companion(c, 20)].family is not synth.VOC_CLASSES[c].family
               for c in range(20))
    habitats = [synth.scene_habitat(rng, s, synth.CLASSES) for s in scenes]
    assert np.mean([h is not None for h in habitats]) == pytest.approx(synth.CONTEXT, abs=0.03)
    assert all(h is None or h is synth.CLASSES[s[0]].family.habitat for h, s in zip(habitats, scenes, strict=True))


def test_a_habitat_gives_the_background_its_hue():
    """A habitat canvas sits in its hue band; the muted one is far less saturated."""
    import colorsys

    for habitat in (synth.GRASS, synth.SAND, synth.SKY, synth.WATER):
        canvas = np.clip(synth._background(np.random.default_rng(1), (64, 64), habitat), 0, 255)
        h, s, _ = colorsys.rgb_to_hsv(*(canvas.reshape(-1, 3).mean(0) / 255))
        assert min(abs(h - habitat.hue), 1 - abs(h - habitat.hue)) < 0.06 and s > 0.15


def test_objects_stand_out_from_the_background(toy_root):
    """Saturation alone separates objects from the muted background: saliency has a cue."""
    gaps = []
    for image_id in [f"val_{i:05d}" for i in range(16)]:
        image = transforms.load_image(toy_root / voc.IMAGES / f"{image_id}.jpg").astype(float)
        saturation = image.max(-1) - image.min(-1)
        mask = voc.load_mask(toy_root, image_id)
        gaps.append(saturation[(mask > 0) & (mask < 255)].mean() - saturation[mask == 0].mean())
    assert np.mean(gaps) > 40 and np.mean(np.array(gaps) > 0) > 0.9


def test_cli_synth_then_check(tmp_path):
    runner, out = CliRunner(), tmp_path / "toy"
    args = ["data", "synth", "--out", str(out), "--n-train", "4", "--n-val", "2", "--size", "48"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "wrote 6 images" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    checked = runner.invoke(app, ["data", "check", "--root", str(out)])
    assert checked.exit_code == 0 and "no problems" in checked.output
    with (out / voc.LISTS / "val.txt").open("a") as handle:
        handle.write("../escape\n")
    checked = runner.invoke(app, ["data", "check", "--root", str(out)])
    assert checked.exit_code == 1 and "val.txt:3: unsafe image id" in checked.output


def test_cli_synth_voc_profile(tmp_path):
    out = tmp_path / "voc"
    result = CliRunner().invoke(app, ["data", "synth", "--profile", "voc", "--out", str(out), "--n-train", "2",
                                      "--n-val", "1"])
    assert result.exit_code == 0 and "wrote 3 images" in result.output
    assert "--profile voc" in (out / "README.md").read_text()
    bad = CliRunner().invoke(app, ["data", "synth", "--profile", "coco", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown synth profile" in bad.output
