"""The VOC reader, transforms and pair sampling, on a hand-made VOC tree (real JPEGs, palette PNGs)."""

from __future__ import annotations

import builtins
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from mcis_cli.cli import app
from mcis_cli.config import DataCfg
from mcis_cli.data import pairs, transforms, voc
from mcis_cli.errors import McisError

LABELS = {"2007_000001": (0, 14), "2007_000002": (6,), "2007_000003": (14,), "2008_000004": (0, 6)}
TRAIN, VAL = ["2007_000001", "2007_000002", "2007_000003"], ["2008_000004"]


def _jpeg(path: Path, h: int = 24, w: int = 32, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _mask(labels: tuple[int, ...], h: int = 24, w: int = 32) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for i, c in enumerate(labels):
        mask[4:12, 2 + 12 * i : 10 + 12 * i] = c + 1
        mask[3, 2 + 12 * i : 10 + 12 * i] = 255
    return mask


def make_voc(root: Path, crlf: bool = False) -> Path:
    """A 4-image VOC2012 tree with the 20 VOC classes (no classes.txt), plus a 2-line extra list."""
    end = "\r\n" if crlf else "\n"
    lists = root / voc.LISTS
    lists.mkdir(parents=True)
    for n, image_id in enumerate(LABELS):
        _jpeg(root / voc.IMAGES / f"{image_id}.jpg", seed=n)
        transforms.save_palette_png(root / voc.MASKS / f"{image_id}.png", _mask(LABELS[image_id]))
    (lists / "train_aug.txt").write_text("".join(f"{i}  {end}" for i in TRAIN))
    (lists / "val.txt").write_text("".join(f"{i}{end}" for i in VAL))
    for name, ids in (("train_cls", TRAIN), ("val_cls", VAL)):
        (lists / f"{name}.txt").write_text(
            "".join(" ".join([i, *map(str, LABELS[i])]) + end for i in ids)
        )
    _jpeg(root / "single" / "dog_1.jpg")
    _jpeg(root / "single" / "cat_1.jpg")
    (lists / "extra.txt").write_text(f"single/dog_1.jpg 12{end}single/cat_1.jpg 8 {end}")
    return root


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "VOC2012")


def _cfg(root: Path, **kw) -> DataCfg:
    return DataCfg(root=str(root), **kw)


def _append(path: Path, text: str) -> int:
    """Append lines; returns the number of the last one."""
    lines = path.read_text().splitlines() + text.splitlines()
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


# ---- reading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("crlf", [False, True])
def test_train_samples_read_labels_and_extra_lists(tmp_path, crlf):
    root = make_voc(tmp_path / "VOC2012", crlf=crlf)
    samples = voc.train_samples(_cfg(root, extra_lists=["extra"]))
    assert [s.id for s in samples] == [*TRAIN, "extra_dog_1", "extra_cat_1"]
    assert samples[0] == voc.Sample("2007_000001", root / voc.IMAGES / "2007_000001.jpg", (0, 14))
    assert samples[-2].labels == (11,) and samples[-1].labels == (7,)  # 1-based in the list
    assert samples[-1].image == root / "single" / "cat_1.jpg"
    val = voc.split_samples(root, "val")
    assert [(s.id, s.labels) for s in val] == [("2008_000004", (0, 6))]
    assert voc.class_names(root) == list(voc.VOC_CLASSES)


def test_training_path_never_opens_a_mask(voc_root, monkeypatch):
    opened: list[str] = []
    for module, name in ((builtins, "open"), (io, "open"), (Image, "open")):
        original = getattr(module, name)

        def spy(path, *args, _original=original, **kwargs):
            opened.append(str(path))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    samples = voc.train_samples(_cfg(voc_root, extra_lists=["extra"]))
    sampler = pairs.PairSampler([s.labels for s in samples], seed=0)
    for index in sampler.epoch_order(0):
        transforms.load_image(samples[index].image)
        transforms.load_image(samples[sampler.epoch_partners(0)[index]].image)
    assert any("JPEGImages" in path for path in opened)  # the spy does see file access
    assert not [path for path in opened if voc.MASKS in path]
    # and with the masks gone altogether, training input is unchanged
    for mask in (voc_root / voc.MASKS).iterdir():
        mask.unlink()
    assert voc.train_samples(_cfg(voc_root, extra_lists=["extra"])) == samples


def test_masks_and_saliency_paths(voc_root):
    mask = voc.load_mask(voc_root, "2007_000001")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 15, 255}
    assert voc.saliency_path(voc_root, "sal", "a") == voc_root / "sal" / "a.png"
    with pytest.raises(McisError, match="unsafe image id"):
        voc.mask_path(voc_root, "../x")


def test_classes_txt_sets_the_class_count(voc_root):
    (voc_root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(McisError, match=r"train_cls\.txt:1: class id 14 out of range 0\.\.1"):
        voc.train_samples(_cfg(voc_root))


# ---- bad input: one McisError naming file and line -----------------------------------------------
@pytest.mark.parametrize(
    "list_name, line, message",
    [
        ("train_aug", "../2007_000001", "unsafe image id"), ("train_aug", "sub/2007_000001", "unsafe image id"),
        ("train_aug", "2007_000009", "not found"), ("train_aug", "2007_000001", "duplicate id"),
        ("train_cls", "2007_000001 20", "out of range 0..19"), ("train_cls", "2007_000001 dog", "not an integer"),
        ("extra", "single/new.jpg 0", "out of range 1..20"), ("extra", "single/new.jpg", "expected `<file> <class>"),
        ("extra", "single/new.jpg 3\nother/new.jpg 4", "duplicate id extra_new"),
        ("extra", "/etc/hostname 3", "absolute path"), ("extra", "../outside.jpg 3", "resolves outside"),
        ("extra", "single/missing.jpg 3", "not found"),
    ],
)
def test_bad_list_lines_name_file_and_line(voc_root, list_name, line, message):
    for image in (
        voc_root.parent / "outside.jpg",
        voc_root / "single/new.jpg",
        voc_root / "other/new.jpg",
    ):
        _jpeg(image)
    path = voc_root / voc.LISTS / f"{list_name}.txt"
    number = _append(path, line)
    with pytest.raises(McisError, match=message) as info:
        voc.train_samples(_cfg(voc_root, extra_lists=["extra"]))
    assert f"{path}:{number}" in str(info.value)
    assert message in "\n".join(voc.check(voc_root).problems)  # check reports it too


def test_symlink_out_of_the_image_folder_is_refused(voc_root):
    outside = voc_root.parent / "secret.jpg"
    _jpeg(outside)
    (voc_root / voc.IMAGES / "2007_000003.jpg").unlink()
    (voc_root / voc.IMAGES / "2007_000003.jpg").symlink_to(outside)
    with pytest.raises(McisError, match=r"train_aug\.txt:3: .* resolves outside"):
        voc.train_samples(_cfg(voc_root))


def test_missing_labels_and_root_say_what_to_do(voc_root, tmp_path):
    with pytest.raises(McisError, match="dataset root not found"):
        voc.train_samples(_cfg(tmp_path / "nowhere"))
    with pytest.raises(McisError, match="dataset root not found"):
        voc.check(tmp_path / "nowhere")
    (voc_root / voc.LISTS / "train_cls.txt").write_text("2007_000001 0\n")
    with pytest.raises(McisError, match=r"train_aug\.txt:2: 2007_000002 has no line"):
        voc.train_samples(_cfg(voc_root))
    for name in voc.CLS_FILES:
        (voc_root / voc.LISTS / name).unlink()
    with pytest.raises(McisError, match="--write-labels"):
        voc.train_samples(_cfg(voc_root))


def test_derive_labels_from_masks(voc_root):
    expected = {name: (voc_root / voc.LISTS / name).read_text() for name in voc.CLS_FILES}
    with pytest.raises(McisError, match="exists"):
        voc.derive_labels(voc_root)
    assert voc.derive_labels(voc_root, force=True) == {"train_cls.txt": 3, "val_cls.txt": 1}
    assert {name: (voc_root / voc.LISTS / name).read_text() for name in voc.CLS_FILES} == expected
    for name in voc.CLS_FILES:
        (voc_root / voc.LISTS / name).unlink()
    result = CliRunner().invoke(app, ["data", "check", "--root", str(voc_root), "--write-labels"])
    assert result.exit_code == 0, result.output
    assert {name: (voc_root / voc.LISTS / name).read_text() for name in voc.CLS_FILES} == expected


# ---- check: every problem in one pass ----------------------------------------------------------
def test_check_counts_a_clean_tree(voc_root):
    report = voc.check(voc_root)
    assert report.problems == []
    assert report.splits["train_aug"].images == 3 and report.splits["train_aug"].masks == 3
    assert report.splits["train_aug"].per_class[14] == 2
    assert report.splits["extra"].per_class[11] == 1 and report.splits["extra"].masks == 0
    console = Console(record=True, width=120)
    voc.print_report(report, console)
    text = console.export_text()
    assert "diningtable" in text and "no problems" in text


def test_check_collects_every_problem(voc_root):
    lists = voc_root / voc.LISTS
    images, masks = voc_root / voc.IMAGES, voc_root / voc.MASKS
    _append(lists / "train_aug.txt", "2007_000009")  # no image
    _append(lists / "train_aug.txt", "a/b")  # unsafe id
    _append(lists / "train_cls.txt", "2007_000003 21")  # out of range
    data = (images / "2007_000002.jpg").read_bytes()
    (images / "2007_000002.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    bad = _mask((14,))
    bad[0, 0] = 40
    transforms.save_palette_png(masks / "2007_000003.png", bad)  # value outside 0..20, 255
    transforms.save_palette_png(masks / "2008_000004.png", _mask((0,), h=20))  # size mismatch
    (masks / "2007_000001.png").unlink()  # one of three train masks missing
    report = voc.check(voc_root)
    expected = [
        "train_aug.txt:4: image",
        "train_aug.txt:5: unsafe image id",
        "train_cls.txt:4: class id 21 out of range",
        "2007_000002.jpg: corrupt or unreadable image",
        "2007_000003.png: mask values [40]",
        "2008_000004.png: size (20, 32) differs from its image (24, 32)",
        "1 of 3 ids have no mask",
    ]
    for text in expected:
        assert any(text in problem for problem in report.problems), (text, report.problems)
    assert len(report.problems) == len(expected)
    console = Console(record=True, width=200)
    voc.print_report(report, console)
    assert "7 problem(s)" in console.export_text()


def test_check_reports_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    problems = voc.check(tmp_path / "empty").problems
    assert sum("missing folder" in p for p in problems) == 3
    assert any("no image-level labels" in p for p in problems)


# ---- images ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    Image.new(mode, (7, 5)).save(path)
    image = transforms.load_image(path)
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8


def test_load_image_errors_name_the_file(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(McisError, match="garbage.jpg: corrupt"):
        transforms.load_image(garbage)
    with pytest.raises(McisError, match="image not found"):
        transforms.load_image(tmp_path / "nope.jpg")
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: a warning
    with pytest.raises(McisError, match="big.png: image too large"):
        transforms.load_image(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: an error
    with pytest.raises(McisError, match="big.png: image too large"):
        transforms.probe_image(big)


def test_palette_png_round_trip(tmp_path):
    mask = np.random.default_rng(0).integers(0, 21, (9, 11), dtype=np.uint8)
    mask[0] = 255
    transforms.save_palette_png(tmp_path / "m.png", mask)
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert np.array_equal(transforms.read_index_png(tmp_path / "m.png"), mask)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.png"]  # no temp file left behind
    Image.new("RGB", (3, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(McisError, match="expected an index PNG"):
        transforms.read_index_png(tmp_path / "rgb.png")
    assert transforms.voc_palette()[15].tolist() == [192, 128, 128]  # person


def test_to_tensor_normalises_with_imagenet_stats():
    image = np.empty((2, 3, 3), np.uint8)
    image[:] = transforms.MEAN_RGB
    x = transforms.to_tensor(image)
    assert x.shape == (3, 2, 3) and x.dtype.is_floating_point
    assert float(x.abs().max()) < 0.01


def test_random_scale_crop_flip_keeps_alignment_and_ignore():
    mask = np.zeros((40, 50), np.uint8)
    mask[5:25, 10:30], mask[20:38, 30:48], mask[0:3, :] = 3, 7, 255
    image = transforms.voc_palette()[mask]  # each class painted its own colour
    for seed in range(6):
        rng = random.Random(seed)
        img, lab = transforms.random_scale_crop_flip(image, mask, 48, (0.6, 1.4), True, rng)
        assert img.shape == (48, 48, 3) and lab.shape == (48, 48)
        assert set(np.unique(lab)) <= {0, 3, 7, 255}
        padded = np.all(img == transforms.MEAN_RGB, axis=-1)
        assert np.all(lab[padded] == 255)
        inside = (lab != 255) & ~padded
        match = np.all(np.abs(img.astype(int) - transforms.voc_palette()[lab]) < 40, axis=-1)
        assert match[inside].mean() > 0.9  # only resampled edge pixels may differ
        again = transforms.random_scale_crop_flip(
            image, mask, 48, (0.6, 1.4), True, random.Random(seed)
        )
        assert np.array_equal(again[0], img) and np.array_equal(again[1], lab)
    small = transforms.random_scale_crop_flip(image, mask, 64, (0.5, 0.5), False, random.Random(0))
    assert np.all(small[1][25:, :] == 255) and np.all(small[1][:, 25:] == 255)


def test_an_image_smaller_than_the_crop_is_padded_not_a_crash():
    """A 200 x 150 image under the official 321 crop and scales 0.7..1.3: padded with the mean
    colour (zero once normalised) and 255 labels, whatever the scale and offset."""
    mask = np.zeros((150, 200), np.uint8)
    mask[40:110, 50:150] = 4
    image = transforms.voc_palette()[mask]
    scales = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    for seed in range(8):
        img, lab = transforms.random_scale_crop_flip(image, mask, 321, scales, True, random.Random(seed), pick=True)
        assert img.shape == (321, 321, 3) and lab.shape == (321, 321)
        padded = lab == 255
        assert padded.mean() > 1 - (150 * 1.3 * 200 * 1.3) / 321**2 - 1e-3  # at most the scaled image
        assert np.all(img[padded] == transforms.MEAN_RGB)
        assert np.abs(transforms.to_tensor(img).numpy()[:, padded]).max() < 0.03
        assert (lab == 4).any() and set(np.unique(lab)) <= {0, 4, 255}


def test_resize_nearest_keeps_index_values():
    mask = np.random.default_rng(0).choice(np.array([0, 4, 255], np.uint8), (13, 17))
    out = transforms.resize(mask, (30, 20), "nearest")
    assert out.shape == (30, 20) and set(np.unique(out)) <= {0, 4, 255}
    maps = transforms.resize(np.ones((4, 4), np.float32), (8, 8), "bicubic")
    assert maps.dtype == np.float32 and np.allclose(maps, 1)


def test_color_jitter_is_seeded_and_keeps_gray_gray():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = transforms.color_jitter(image, [0.3, 0.3, 0.3, 0.1], random.Random(1))
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert np.array_equal(
        out, transforms.color_jitter(image, [0.3, 0.3, 0.3, 0.1], random.Random(1))
    )
    assert np.array_equal(transforms.color_jitter(image, [0, 0, 0, 0], random.Random(1)), image)
    random.seed(5)  # without an rng: Python's global generator
    first = transforms.color_jitter(image, [0.3, 0.3, 0.3, 0.1])
    random.seed(5)
    assert np.array_equal(first, transforms.color_jitter(image, [0.3, 0.3, 0.3, 0.1]))
    gray = np.full((4, 4, 3), 128, np.uint8)
    jittered = transforms.color_jitter(gray, [0.3, 0.3, 0.3, 0.5], random.Random(2))
    assert np.all(jittered == jittered[..., :1])  # hue and saturation leave gray alone
    brighter = transforms.color_jitter(gray, [0.3, 0, 0, 0], random.Random(3))
    assert abs(int(brighter[0, 0, 0]) - 128) <= 0.3 * 128 + 1


# ---- pairs -------------------------------------------------------------------------------------
LABEL_ROWS = [(0,), (1,), (0, 1), (2,), (2, 3), (3,), (1, 3), ()]


def test_partner_always_shares_a_class():
    sampler = pairs.PairSampler(LABEL_ROWS, seed=3)
    rng = random.Random(0)
    for _ in range(20):
        for index, row in enumerate(LABEL_ROWS):
            partner = sampler.partner(index, rng)
            assert not row or set(row) & set(LABEL_ROWS[partner])
    assert sorted(set(sampler.related(3, 50, rng))) == [4, 5, 6]
    with pytest.raises(McisError, match="class 9"):
        sampler.related(9, 2, rng)


def test_epoch_pairs_are_reproducible_from_seed_and_epoch():
    a, b = pairs.PairSampler(LABEL_ROWS, seed=3), pairs.PairSampler(LABEL_ROWS, seed=3)
    assert a.epoch_partners(5) == b.epoch_partners(5) and a.epoch_order(5) == b.epoch_order(5)
    assert sorted(a.epoch_order(5)) == list(range(len(LABEL_ROWS)))
    epochs = {tuple(a.epoch_partners(e)) for e in range(6)}
    assert len(epochs) > 1  # pairs change between epochs
    other = pairs.PairSampler(LABEL_ROWS, seed=4)
    assert any(tuple(other.epoch_partners(e)) not in epochs for e in range(6))


def test_shard_gives_every_rank_an_equal_slice():
    order = list(range(10))
    shards = [pairs.shard(order, rank, 4) for rank in range(4)]
    assert all(len(s) == 3 for s in shards)
    assert sorted(sum(shards, [])) == sorted(order + order[:2])
    assert pairs.shard([7], 1, 3) == [7]
    assert pairs.shard(order, 0, 1) == order
