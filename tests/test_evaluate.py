"""Test-time inference and the `evaluate` stage on pseudolabel-, localize- and segment-runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import jaccard_score
from torch import nn
from typer.testing import CliRunner

from mcis_cli import engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.stages import evaluate
from mcis_cli.tta import predict_probs
from tests import ranks

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
COLOURS = np.array([[128, 128, 128], [220, 30, 30], [30, 220, 30], [30, 30, 220]], np.uint8)


# ---- inference ---------------------------------------------------------------------------
class ColourNet(nn.Module):
    """Logits = one-hot of the dominant channel (class 1..3), or background where the pixel is
    grey: a per-pixel, flip-equivariant model that knows the answer. Records its input sizes."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        spread = x.amax(1) - x.amin(1)
        label = torch.where(spread > 1.0, x.argmax(1) + 1, 0)
        return 10 * nn.functional.one_hot(label, 4).permute(0, 3, 1, 2).float()


def _blocks(h=60, w=90) -> np.ndarray:
    labels = np.zeros((h, w), np.int64)
    labels[5:40, 4:30] = 1
    labels[20:55, 41:70] = 2
    labels[:25, 75:] = 3  # nothing symmetric: a flip that is not undone would show
    return labels


def test_multiscale_flip_window_returns_the_input_labels():
    labels = _blocks()
    model = ColourNet()
    probs = predict_probs(model, COLOURS[labels], scales=(0.5, 1.0, 1.5), flip=True, window=48)
    assert probs.shape == (4, 60, 90) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    pred = probs.argmax(0)
    assert (pred == labels).mean() > 0.98  # only resampled edges may differ
    interior = np.ones_like(labels, bool)
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            interior &= np.roll(labels, (dy, dx), (0, 1)) == labels
    np.testing.assert_array_equal(pred[interior], labels[interior])
    assert max(max(s) for s in model.sizes) <= 48  # 1.0x and 1.5x went through 48 px windows
    assert (30, 45) in model.sizes  # 0.5x fits a window: one forward of the whole image


def test_whole_image_single_scale_is_exact():
    labels = _blocks(33, 47)
    pred = predict_probs(ColourNet(), COLOURS[labels]).argmax(0)
    np.testing.assert_array_equal(pred, labels)


class ConstantNet(nn.Module):
    """The same logits at every pixel, at the input size; records its input sizes."""

    def __init__(self):
        super().__init__()
        self.sizes = []
        self.logits = torch.tensor([0.5, 2.0, -1.0, 0.0])

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.logits.view(1, 4, 1, 1).expand(x.shape[0], 4, *x.shape[-2:])


def test_official_upsampling_of_constant_logits_is_constant():
    model = ConstantNet()
    image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    probs = predict_probs(model, image, (0.5, 1.0, 1.5), flip=True, window=64, upsample="official")
    assert probs.shape == (4, 45, 70)
    expected = model.logits.softmax(0).numpy()[:, None, None]
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-5)
    assert set(model.sizes) == {(64, 64)}  # every forward a full, padded window


def test_official_window_larger_than_the_image_is_padding_then_crop():
    labels = _blocks(33, 47)
    model = ColourNet()
    pred = predict_probs(model, COLOURS[labels], window=401, upsample="official").argmax(0)
    np.testing.assert_array_equal(pred, labels)  # the zero (mean colour) padding is cropped off
    assert model.sizes == [(401, 401)]


@pytest.mark.parametrize("size", [(375, 500), (500, 333), (333, 500)])
def test_official_voc_sizes_come_back_at_the_image_size(size):
    h, w = size
    labels = np.zeros(size, np.int64)
    labels[h // 4 : h // 2, w // 5 : w // 2] = 1
    labels[h // 2 :, w // 2 :] = 3
    model = ColourNet()
    probs = predict_probs(model, COLOURS[labels], (0.5, 0.75, 1.0, 1.25, 1.5), flip=True, window=401,
                          upsample="official")
    assert probs.shape == (4, h, w)
    assert set(model.sizes) == {(401, 401)}  # 401 = 8 * 50 + 1: the model's x8 upsampling is exact
    assert (probs.argmax(0) == labels).mean() > 0.99


def test_unknown_upsample_is_refused():
    with pytest.raises(ValueError, match="upsample"):
        predict_probs(ColourNet(), COLOURS[_blocks(8, 8)], upsample="nearest")


def test_overlay_ids_are_spread_and_stable():
    samples = [voc.Sample(f"s{i}", Path("x"), ()) for i in range(10)]
    assert evaluate.overlay_ids(samples, 3) == {"s0", "s4", "s9"}
    assert evaluate.overlay_ids(samples, 30) == {s.id for s in samples}
    assert evaluate.overlay_ids(samples, 0) == set()


def test_results_markdown_holds_what_was_measured_and_nothing_published():
    result = {key: {"background": 0.9, "aeroplane": float("nan")} for key in ("iou", "precision", "recall")}
    summary = {"miou": 0.612, "miou_nocrf": 0.598}
    text = evaluate.results_markdown("t", "measured so", summary, result, [(0.3, 0.5)])
    assert "| aeroplane | - | - | - |" in text and "| miou_nocrf | 0.5980 |" in text
    assert "| 0.30 | 50.0 |" in text
    assert "MCIS" not in text and "PSA" not in text  # published figures live in docs/results.md


def test_results_table_title_is_one_line(monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(evaluate, "out", Console(width=80, record=True))
    title = f"segment run {'0123456789abcdef' * 2} on val + CRF"
    result = {k: {"background": 0.9, "a": 0.5} for k in ("iou", "precision", "recall")}
    evaluate._print_table(title, {"miou": 0.7}, result)
    assert evaluate.out.export_text().splitlines()[0] == title


def test_figures_render(tmp_path):
    from mcis_cli import reporting

    labels = _blocks(30, 45).astype(np.uint8)
    rows = [(COLOURS[labels], labels, labels), (COLOURS[labels[:20]], labels[:20], labels[:20])]
    grid = reporting.overlay_grid(rows, height=40, gap=2)
    assert grid.shape == (40 + 2 + 40, 3 * 90 + 2 * 2, 3) and grid.dtype == np.uint8  # widest tile
    truth_tile = grid[:40, 92 + 15:92 + 15 + 60].reshape(-1, 3)  # 60 px wide, centred in its column
    assert {tuple(c) for c in truth_tile} == {tuple(c) for c in reporting.colorize(np.unique(labels))}
    assert (grid[:40, 92:92 + 15] == 255).all()  # the narrower row's padding
    names = ["background", "red", "green", "blue"]
    full = _blocks().astype(np.uint8)  # all 4 classes; the prediction leaves class 3 unlabelled
    overlays = reporting.overlay_figure([(COLOURS[full], full, np.where(full == 3, 255, full))],
                                    names, height=40, gap=2)
    texts = [t.get_text() for t in overlays.axes[0].texts]
    assert texts == ["image", "ground truth", "prediction"]
    assert [t.get_text() for t in overlays.legends[0].get_texts()] == [*names, "ignored"]
    overlays.savefig(tmp_path / "overlays.png")
    width, height = Image.open(tmp_path / "overlays.png").size
    assert width == 3 * 60 + 2 * 2  # the grid at its own size
    assert height > 40 + 5 * 15  # + the titles and a legend of 5 entries in one column
    chart = reporting.ablation_chart({"CAM": {"maps": [0.3, 0.32], "pseudo": [0.4, 0.5]},
                                  "MCIS": {"maps": [0.41, 0.4], "pseudo": [0.5, 0.6]}})
    assert [len(ax.patches) for ax in chart.axes] == [2, 2]  # a panel per metric, a bar per variant
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 3]])
    for figure in (chart, reporting.confusion_figure(cm, ["a", "b", "c"]),
                   reporting.iou_figure({"a": 0.5, "b": float("nan")}, 0.5),
                   reporting.sweep_figure([0.1, 0.2], {"mIoU": [0.3, 0.4]}, "threshold", 0.2)):
        figure.savefig(tmp_path / "f.png")
        assert (tmp_path / "f.png").stat().st_size > 1000


# ---- a dataset and a store ---------------------------------------------------------------
def _write_tree(root: Path, n_train: int = 6, n_val: int = 4, size: int = 40) -> Path:
    """Coloured blocks on grey noise, one or two classes per image, a 255 border row."""
    rng = np.random.default_rng(0)
    lists = root / "ImageSets" / "Segmentation"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, count in (("train_aug", n_train), ("val", n_val)):
        ids, cls_lines = [], []
        for i in range(count):
            image_id = f"{split}_{i:02d}"
            mask = np.zeros((size, size), np.uint8)
            present = sorted({1 + i % 3, 1 + (i * 2 + 1) % 3})[: 1 + i % 2]
            for c in present:
                top, left = rng.integers(2, size - 16, 2)
                mask[top : top + 14, left : left + 14] = c
            image = np.where(mask[..., None] > 0, COLOURS[mask],
                             rng.integers(110, 150, (size, size, 3))).astype(np.uint8)
            mask[0] = 255
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            transforms.save_palette_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
            ids.append(image_id)
            cls_lines.append(" ".join([image_id, *(str(c - 1) for c in np.unique(mask) if 0 < c < 255)]))
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (lists / f"{split.split('_')[0]}_cls.txt").write_text("\n".join(cls_lines) + "\n")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("data") / "VOC2012")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One tracking store for the module: creating an MLflow database costs seconds."""
    path = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}/mlflow.db")
        patch.chdir(path)
        yield path


def _overrides(root: Path, tmp: Path, **extra) -> list[str]:
    values = {
        "name": "evaltest", "device": "cpu", "output_dir": str(tmp / "runs"), "data.root": str(root),
        "data.workers": 0, "segment.width": 0.125, "segment.pretrained": False,
        "segment.batch_size": 2, "segment.crop": 33, "segment.iters": 5, "segment.lr": 0.01,
        "segment.val_every": 0, "segment.checkpoint_every": 5, "evaluate.overlays": 2,
        "evaluate.jobs": 2, "tracking.flush_every": 1,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


def _config(root: Path, tmp: Path, **extra):
    return load_config(REPO / "configs" / "toy.yaml", _overrides(root, tmp, **extra))


def _fake_run(cfg, stage: str, folder: Path, artifact: str) -> str:
    with engine.stage_run(cfg, stage) as tracker:
        tracker.log_artifacts(folder, artifact)
        return tracker.run_id


def _artifacts(run_id: str, path: str = "") -> set[str]:
    return {a.path for a in tracking.client().list_artifacts(run_id, path)}


# ---- pseudo masks ------------------------------------------------------------------------
def test_pseudo_masks_are_scored_over_labelled_pixels(root, store):
    cfg = _config(root, store)
    rng = np.random.default_rng(1)
    truth, guess, n_ignored, n_pixels = [], [], 0, 0
    for sample in voc.split_samples(root, "train_aug"):
        gt = voc.load_mask(root, sample.id)
        pseudo = gt.copy()
        pseudo[rng.random(gt.shape) < 0.1] = 0  # some object pixels lost to background
        pseudo[rng.random(gt.shape) < 0.2] = 255  # and a fifth left unlabelled
        transforms.save_palette_png(store / "pseudo" / f"{sample.id}.png", pseudo)
        keep = (gt != 255) & (pseudo != 255)
        truth.append(gt[keep])
        guess.append(pseudo[keep])
        n_ignored += int((pseudo == 255).sum())
        n_pixels += pseudo.size
    source = _fake_run(cfg, "pseudolabel", store / "pseudo", "pseudo")

    result = evaluate.run(cfg, from_run=source)
    truth, guess = np.concatenate(truth), np.concatenate(guess)
    expected = jaccard_score(truth, guess, labels=range(4), average=None)
    run = tracking.resolve_run(cfg, "evaluate", result.run_id)
    assert run.metrics["miou"] == pytest.approx(expected.mean())
    for name, iou in zip(["background", *CLASSES], expected, strict=True):
        assert run.metrics[f"iou/{name}"] == pytest.approx(iou)
    assert run.metrics["ignore_fraction"] == pytest.approx(n_ignored / n_pixels)
    # pixels were only lost to the background: object classes keep precision 1, recall drops
    assert run.metrics["precision/red"] == 1.0 and run.metrics["recall/red"] < 1
    assert run.metrics["recall/background"] == 1.0 and run.metrics["precision/background"] < 1
    assert run.tags["mcis.scored_stage"] == "pseudolabel" and run.tags["mcis.split"] == "train_aug"
    assert run.tags[tracking.SOURCE_TAG] == source and run.tags["mcis.crf"] == "false"
    assert {"confusion.csv", "results.md", "scores.json", "plots"} <= _artifacts(run.run_id)
    assert {"plots/confusion.png", "plots/iou.png", "plots/overlays.png"} <= _artifacts(run.run_id, "plots")
    rows = Path(run.fetch("confusion.csv")).read_text().splitlines()
    assert rows[0].split(",")[1:] == ["background", *CLASSES] and len(rows) == 5
    assert "| red |" in Path(run.fetch("results.md")).read_text()

    with pytest.raises(McisError, match="--split train_aug"):  # it made no val masks
        evaluate.run(cfg, from_run=source, split="val")


# ---- localization maps -------------------------------------------------------------------
def test_localization_maps_get_a_threshold_sweep(root, store):
    """Maps are 0.5..0.8 on their object and 0..0.3 elsewhere: every background threshold in
    [0.3, 0.5) is perfect and the sweep must find the first of them, 0.3."""
    from mcis_cli.artifacts import save_maps

    cfg = _config(root, store, **{"quality.bg_sweep": [round(0.05 * i, 2) for i in range(1, 13)]})
    rng = np.random.default_rng(2)
    for sample in voc.split_samples(root, "train_aug"):
        gt = voc.load_mask(root, sample.id)
        classes = [c for c in range(3) if (gt == c + 1).any()]
        maps = np.stack([0.5 * (gt == c + 1) + 0.29 * rng.random(gt.shape) for c in classes])
        save_maps(store / "maps" / f"{sample.id}.npz", maps, classes)
    source = _fake_run(cfg, "localize", store / "maps", "maps")

    result = evaluate.run(cfg, from_run=source)
    assert result.metrics["best_threshold"] == pytest.approx(0.3)
    assert result.metrics["miou"] == pytest.approx(1.0)
    curve = {m.step: m.value for m in tracking.client().get_metric_history(result.run_id, "sweep/miou")}
    assert sorted(curve) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    assert curve[5] < 0.9 and curve[45] == pytest.approx(1.0) and curve[55] < 1.0
    assert "plots/sweep.png" in _artifacts(result.run_id, "plots")


# ---- a trained segmenter -----------------------------------------------------------------
@pytest.mark.slow
def test_segment_runs_with_and_without_crf_and_the_ceiling(root, store):
    from mcis_cli.stages import segment

    one_view = {"evaluate.scales": "[1.0]", "evaluate.flip": False}  # scales/flip: tested above
    cfg = _config(root, store, **one_view)
    gt_run = segment.run(cfg, labels="gt").run_id
    with pytest.raises(McisError, match="no finished segment run"):
        evaluate.run(_config(root, store, name="other"))
    with pytest.raises(McisError, match="no finished segment run of the method"):
        evaluate.run(cfg)  # the default never takes the ceiling
    crf = evaluate.run(cfg, from_run=gt_run)  # on val, with CRF
    run = tracking.resolve_run(cfg, "evaluate", crf.run_id)
    assert run.tags[tracking.SOURCE_TAG] == gt_run and run.tags["mcis.crf"] == "true"
    assert run.tags["mcis.split"] == "val"
    assert crf.metrics["crf_gain"] == pytest.approx(crf.metrics["miou"] - crf.metrics["miou_nocrf"])
    assert "nocrf/iou/background" in run.metrics and "ceiling_fraction" not in run.metrics

    args = ["evaluate", "--config", str(REPO / "configs" / "toy.yaml"), "--from-run", gt_run,
            "--no-crf", "--save", *sum((["--set", s] for s in _overrides(root, store, **one_view)), [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plain = tracking.find_runs(cfg, "evaluate", **{"mcis.crf": "false"})[0]
    assert plain.metrics["miou"] == pytest.approx(crf.metrics["miou_nocrf"])  # same inference
    assert len(_artifacts(plain.run_id, "masks")) == 4
    assert "red" in result.output  # the per-class table

    # a model trained on (perfect) pseudo masks is scored against the gt-trained ceiling
    for sample in voc.split_samples(root, "train_aug"):
        transforms.save_palette_png(store / "pseudo" / f"{sample.id}.png", voc.load_mask(root, sample.id))
    pseudo_run = _fake_run(cfg, "pseudolabel", store / "pseudo", "pseudo")
    cfg.segment.iters = 1
    weak = segment.run(cfg, from_run=pseudo_run).run_id
    scored = evaluate.run(cfg)  # default: the method's newest segment run
    assert tracking.get_run(cfg, scored.run_id, "evaluate").tags[tracking.SOURCE_TAG] == weak
    assert scored.metrics["ceiling_miou"] == pytest.approx(crf.metrics["miou"])
    assert scored.metrics["ceiling_fraction"] == pytest.approx(scored.metrics["miou"] / crf.metrics["miou"])


# ---- under torchrun ----------------------------------------------------------------------
def _same_scores(cfg, one: str, two: str) -> None:
    mlc = tracking.client()
    a, b = mlc.get_run(one).data.metrics, mlc.get_run(two).data.metrics
    assert a == b and "miou" in a and "iou/red" in a  # mIoU and per-class IoU to the last digit
    curves = [[m.value for m in mlc.get_metric_history(run, "sweep/miou")] for run in (one, two)]
    assert curves[0] == curves[1]
    csv = [tracking.get_run(cfg, run, "evaluate").fetch("confusion.csv").read_text() for run in (one, two)]
    assert csv[0] == csv[1]


@pytest.mark.slow
def test_two_ranks_score_as_one_with_the_crf_pool_per_rank(root, store):
    from mcis_cli.artifacts import save_maps
    from mcis_cli.stages import segment

    extra = {"name": "eval2", "evaluate.scales": "[1.0, 1.5]", "evaluate.save_masks": True}
    cfg = _config(root, store, **extra)
    rng = np.random.default_rng(3)
    for sample in voc.split_samples(root, "train_aug"):
        gt = voc.load_mask(root, sample.id)
        classes = [c for c in range(3) if (gt == c + 1).any()]
        save_maps(store / "maps2" / f"{sample.id}.npz", rng.random((len(classes), *gt.shape)), classes)
    sources = [segment.run(cfg, labels="gt").run_id, _fake_run(cfg, "localize", store / "maps2", "maps")]
    for source in sources:
        one = evaluate.run(cfg, from_run=source)
        done = ranks.torchrun(["evaluate", "--config", str(REPO / "configs" / "toy.yaml"), "--from-run", source,
                               *sum((["--set", s] for s in _overrides(root, store, **extra)), [])])
        assert done.returncode == 0, done.stderr[-3000:]
        runs = tracking.find_runs(cfg, "evaluate", **{tracking.SOURCE_TAG: source})
        assert len(runs) == 2  # rank 1 opened no run of its own
        _same_scores(cfg, one.run_id, runs[0].run_id)
        masks = [sorted(Path(engine.workdir(cfg, r.run_id), "masks").glob("*.png")) for r in runs]
        assert [p.name for p in masks[0]] == [p.name for p in masks[1]] and masks[0]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(*masks, strict=True))
