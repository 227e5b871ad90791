"""Pseudo masks: every rule of gen_gt.py (§3) and the cam background on hand-made cases, and the
whole chain classify -> localize -> pseudolabel through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import artifacts, engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import PseudolabelCfg, load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.stages import pseudolabel as pl
from tests import ranks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
P = PseudolabelCfg()  # the official thresholds: att 0.95, fg 0.3, conflict 0.99, bg 32/255, min_fg 1%


def test_normalise_min_max_per_class_and_flat_maps_become_zero():
    maps = np.array([[[1, 3], [5, 5]], [[2, 2], [2, 2]]], np.float32)
    out = pl.normalise(maps)
    np.testing.assert_allclose(out[0], [[0, 0.5], [1, 1]])
    assert not out[1].any()


def test_saliency_planes_background_is_one_minus_saliency():
    maps = np.array([[[0.2, 0.9]]], np.float32)
    planes = pl.saliency_planes(maps, np.array([[0.25, 1.0]], np.float32))
    np.testing.assert_allclose(planes, [[[0.75, 0.0]], [[0.2, 0.9]]])


def test_saliency_attention_raises_confident_map_pixels_to_one():
    sal = np.array([[0.1, 0.1, 0.5]], np.float32)
    maps = np.array([[[0.96, 0.5, 0.2]], [[0.1, 0.94, 0.1]]], np.float32)
    np.testing.assert_allclose(pl.saliency_attention(sal, maps, 0.95), [[1.0, 0.1, 0.5]])
    np.testing.assert_allclose(pl.saliency_attention(sal, maps[:0], 0.95), sal)


def test_suppress_zeroes_low_scores_background_included():
    planes = np.array([[[0.29, 0.3]], [[0.1, 0.8]]], np.float32)
    np.testing.assert_allclose(pl.suppress(planes, 0.3), [[[0, 0.3]], [[0, 0.8]]])


def test_conflicts_need_two_planes_above_the_threshold():
    planes = np.array([[[1.0, 1.0, 0.5]], [[1.0, 0.5, 0.5]], [[0.995, 0.2, 1.0]]], np.float32)
    np.testing.assert_array_equal(pl.conflicts(planes, 0.99), [[True, False, False]])


def test_assign_maps_plane_index_to_class_ids_and_zero_pixels_to_background():
    planes = np.array([[[0.0, 0.2, 0.9]], [[0.0, 0.7, 0.1]], [[0.0, 0.1, 0.3]]], np.float32)
    np.testing.assert_array_equal(pl.assign(planes, [4, 6]), [[0, 5, 0]])


def test_salient_background_becomes_ignore():
    labels = np.array([[0, 0, 3, 0]], np.uint8)
    sal_att = np.array([[0.5, 0.1, 0.9, 32 / 255]], np.float32)
    np.testing.assert_array_equal(pl.ignore_salient_background(labels, sal_att, 32 / 255), [[255, 0, 3, 255]])


def test_too_little_foreground_ignores_the_whole_mask():
    labels = np.zeros((10, 10), np.uint8)
    labels[0, 0] = 2  # 1% foreground: kept
    np.testing.assert_array_equal(pl.require_foreground(labels, 0.01), labels)
    labels[0, 0] = 255  # ignored pixels are not foreground
    assert (pl.require_foreground(labels, 0.01) == 255).all()


def test_saliency_labels_apply_every_rule_in_order():
    # pixels: clear class 2 | background | salient, no map | conflict | salient, weak map
    sal = np.array([[0.9, 0.0, 0.8, 1.0, 0.8]], np.float32)
    maps = np.array([[[1.0, 0.0, 0.1, 1.0, 0.25]], [[0.2, 0.0, 0.0, 1.0, 0.0]]], np.float32)
    labels = pl.saliency_labels(maps, [2, 5], sal, P)
    # classes 2 and 5 both at 1.0 conflict -> 255; salient pixels left to the background -> 255
    np.testing.assert_array_equal(labels, [[3, 0, 255, 255, 255]])
    # with fg_thr 0.2 the weak map (0.25) survives and beats the background (1 - 0.8)
    np.testing.assert_array_equal(pl.saliency_labels(maps, [2, 5], sal, P, fg_thr=0.2), [[3, 0, 255, 255, 3]])


def test_saliency_labels_without_foreground_are_all_ignored():
    sal = np.zeros((4, 4), np.float32)
    maps = np.zeros((1, 4, 4), np.float32)
    assert (pl.saliency_labels(maps, [0], sal, P) == 255).all()


def test_cam_labels_threshold_and_background_power():
    maps = np.array([[[1.0, 0.6, 0.4, 0.0]]], np.float32)
    p = PseudolabelCfg(background="cam", cam_threshold=0.5, cam_bg_power=1.0, min_fg=0.0)
    # bg = 1 - max: 0, 0.4, 0.6, 1 -> class where map > bg and map > threshold
    np.testing.assert_array_equal(pl.cam_labels(maps, [1], p), [[2, 2, 0, 0]])
    # a higher power shrinks the background score: 0.4 ** 4 < 0.4, but the threshold still rules
    p4 = PseudolabelCfg(background="cam", cam_threshold=0.3, cam_bg_power=4.0, min_fg=0.0)
    np.testing.assert_array_equal(pl.cam_labels(maps, [1], p4), [[2, 2, 2, 0]])
    np.testing.assert_array_equal(pl.cam_labels(maps, [1], p4, threshold=0.7), [[2, 0, 0, 0]])
    assert (pl.make_labels(maps, [1], None, p4) == pl.cam_labels(maps, [1], p4)).all()


def test_saliency_folder_png_is_read_at_image_size(tmp_path):
    root = tmp_path / "voc"
    (root / "sal").mkdir(parents=True)
    Image.fromarray(np.full((8, 10), 255, np.uint8)).save(root / "sal" / "a.png")
    cfg = load_config(CONFIG, [f"data.root={root}", "data.saliency_dir=sal", "pseudolabel.saliency=folder",
                               "pseudolabel.binarize=none", "pseudolabel.fill_radius=0"])
    sal = pl.load_saliency(cfg, voc.Sample("a", root / "a.jpg", (0,)), np.zeros((16, 20, 3), np.uint8))
    assert sal.shape == (16, 20) and np.allclose(sal, 1)


@pytest.mark.parametrize("binarize", ["none", "adaptive"])
def test_saliency_is_binarised_at_twice_its_mean_when_asked(tmp_path, binarize):
    root = tmp_path / "voc"
    (root / "sal").mkdir(parents=True)
    values = np.array([[0, 20, 40, 200]], np.uint8)  # mean 65: the cut is 130
    Image.fromarray(values).save(root / "sal" / "a.png")
    cfg = load_config(CONFIG, [f"data.root={root}", "data.saliency_dir=sal", "pseudolabel.saliency=folder",
                               f"pseudolabel.binarize={binarize}", "pseudolabel.fill_radius=0"])
    sal = pl.load_saliency(cfg, voc.Sample("a", root / "a.jpg", (0,)), np.zeros((1, 4, 3), np.uint8))
    expected = [[0, 0, 0, 1]] if binarize == "adaptive" else values / 255
    np.testing.assert_allclose(sal, expected, atol=1e-6)


def test_binarised_saliency_is_closed_and_filled_when_asked(tmp_path):
    """A ring with a one-pixel gap becomes a solid disk; a strip along the border is dropped."""
    root = tmp_path / "voc"
    (root / "sal").mkdir(parents=True)
    y, x = np.mgrid[:40, :40]
    ring = (np.abs(np.hypot(y - 20, x - 20) - 8) <= 1.5) & ~((y == 20) & (x > 20))
    blob = (y < 2) & (x > 10) & (x < 30)  # within the radius of the border
    Image.fromarray(((ring | blob) * 255).astype(np.uint8)).save(root / "sal" / "a.png")
    cfg = load_config(CONFIG, [f"data.root={root}", "data.saliency_dir=sal", "pseudolabel.saliency=folder",
                               "pseudolabel.binarize=adaptive", "pseudolabel.fill_radius=2"])
    sal = pl.load_saliency(cfg, voc.Sample("a", root / "a.jpg", (0,)), np.zeros((40, 40, 3), np.uint8))
    assert (sal[np.hypot(y - 20, x - 20) <= 7] == 1).all()  # the inside and the gap are filled
    assert not sal[blob].any() and not sal[np.hypot(y - 20, x - 20) > 10].any()
    with pytest.raises(McisError, match="binarize=adaptive"):
        load_config(CONFIG, ["pseudolabel.binarize=none", "pseudolabel.fill_radius=2"])


# ---- the chain through the command line ---------------------------------------------------
@pytest.mark.slow
def test_classify_localize_pseudolabel_cli(toy_root: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    sets = [
        "name=chain", "device=cpu", f"output_dir={tmp_path / 'runs'}", f"data.root={toy_root}",
        "data.workers=0", "classify.epochs=1", "classify.checkpoint_epoch=0", "classify.input_size=32",
        "classify.batch_size=8", "classify.width=0.125", "classify.pretrained=false",
        "localize.partners=2", "localize.batch_size=8", "pseudolabel.saliency=computed",
        "pseudolabel.sweep=[0.2,0.3,0.5]",
        "pseudolabel.min_fg=0",  # a one-epoch classifier may find no foreground: keep the masks

    ]
    args = ["--config", str(CONFIG), *(a for s in sets for a in ("--set", s))]
    runner = CliRunner()
    for command in ("classify", "localize", "pseudolabel"):
        result = runner.invoke(app, [command, *args])
        assert result.exit_code == 0, (command, result.output)

    cfg = load_config(CONFIG, sets)
    samples = voc.train_samples(cfg.data)
    maps_run = tracking.resolve_run(cfg, "localize")
    pseudo_run = tracking.resolve_run(cfg, "pseudolabel")
    assert pseudo_run.tags[tracking.SOURCE_TAG] == maps_run.run_id
    maps_dir, pseudo_dir = maps_run.fetch("maps"), pseudo_run.fetch("pseudo")
    for sample in samples:
        maps, classes = artifacts.load_maps(maps_dir / f"{sample.id}.npz")
        image = transforms.load_image(sample.image)
        assert maps.dtype == np.float16 and maps.shape == (len(sample.labels), *image.shape[:2])
        assert list(classes) == list(sample.labels) and maps.min() >= 0 and maps.max() <= 1
        labels = transforms.read_index_png(pseudo_dir / f"{sample.id}.png")
        assert labels.shape == image.shape[:2]
        assert set(np.unique(labels)) <= {0, 255, *(c + 1 for c in sample.labels)}
    for key in ("maps/miou", "maps/best_threshold"):
        assert key in maps_run.metrics
    for key in ("pseudo/miou", "pseudo/ignore_frac", "saliency/fmeasure", "saliency/mae"):
        assert key in pseudo_run.metrics
    assert 0 <= pseudo_run.metrics["pseudo/miou"] <= 1
    assert pseudo_run.fetch("pseudo_overlays.png").is_file()
    assert pseudo_run.fetch("pseudo_sweep.png").is_file()
    assert maps_run.fetch("maps_overlays.png").is_file()


def test_written_masks_do_not_depend_on_ground_truth(toy_root: Path, tmp_path):
    """The same maps give the same pseudo masks whether or not the dataset has masks."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(toy_root, bare, ignore=shutil.ignore_patterns("SegmentationClassAug"))
    rng = np.random.default_rng(0)
    maps_dir = tmp_path / "maps"
    samples = voc.train_samples(load_config(CONFIG, [f"data.root={toy_root}"]).data)[:4]
    for sample in samples:
        h, w = transforms.load_image(sample.image).shape[:2]
        artifacts.save_maps(maps_dir / f"{sample.id}.npz",
                           rng.random((len(sample.labels), h, w)).astype(np.float32), sample.labels)
    k = len(voc.class_names(toy_root)) + 1
    outcomes = {}
    for name, root in (("gt", toy_root), ("bare", bare)):
        cfg = load_config(CONFIG, [f"data.root={root}", "pseudolabel.saliency=computed"])
        for sample in voc.train_samples(cfg.data)[:4]:
            outcomes[name, sample.id] = pl._process(cfg, sample, maps_dir, tmp_path / name, k)
    for sample in samples:
        a = transforms.read_index_png(tmp_path / "gt" / f"{sample.id}.png")
        b = transforms.read_index_png(tmp_path / "bare" / f"{sample.id}.png")
        np.testing.assert_array_equal(a, b)
        assert "cm" in outcomes["gt", sample.id] and "cm" not in outcomes["bare", sample.id]


@pytest.mark.slow
def test_two_ranks_write_the_masks_and_numbers_of_one(toy_root: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    sets = ["name=pseudo2", "device=cpu", f"output_dir={tmp_path / 'runs'}", f"data.root={toy_root}",
            "pseudolabel.saliency=computed", "pseudolabel.sweep=[0.2,0.3,0.5]", "tracking.flush_every=1"]
    cfg = load_config(CONFIG, sets)
    rng = np.random.default_rng(0)
    for sample in voc.train_samples(cfg.data):
        h, w = transforms.load_image(sample.image).shape[:2]
        artifacts.save_maps(tmp_path / "maps" / f"{sample.id}.npz",
                            rng.random((len(sample.labels), h, w)).astype(np.float32), sample.labels)
    with engine.stage_run(cfg, "localize") as tracker:
        tracker.log_artifacts(tmp_path / "maps", artifacts.MAPS)
    one = pl.run(cfg, from_run=tracker.run_id)
    done = ranks.torchrun(["pseudolabel", "--config", str(CONFIG), "--from-run", tracker.run_id,
                           *(a for s in sets for a in ("--set", s))])
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tracking.find_runs(cfg, "pseudolabel")
    assert len(runs) == 2  # rank 1 opened no run of its own
    two, single = runs[0], tracking.resolve_run(cfg, "pseudolabel", one.run_id)
    a, b = (sorted(r.fetch("pseudo").glob("*.png")) for r in (single, two))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 48
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    def method(metrics):  # what the method measured, not the machine it ran on (system/*)
        return {k: v for k, v in metrics.items() if not k.startswith("system/")}

    assert method(two.metrics) == method(single.metrics)  # mIoU, per class, precision / recall, ignored, saliency
    assert {"pseudo/miou", "saliency/fmeasure", "saliency/mae"} <= set(two.metrics)
    mlc = tracking.client()
    for key in ("sweep/miou", "sweep/ignore_frac"):
        assert ([m.value for m in mlc.get_metric_history(two.run_id, key)]
                == [m.value for m in mlc.get_metric_history(single.run_id, key)])
    assert (two.fetch("pseudo_confusion.csv").read_text()
            == single.fetch("pseudo_confusion.csv").read_text())
