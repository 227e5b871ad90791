"""DeepLab-LargeFOV models and the `segment` stage: schedule, crops, forward contract, runs,
bit-exact resume, and a 2-process gloo run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import artifacts, engine, tracking, training
from mcis_cli.cli import app
from mcis_cli.config import SegmentCfg, load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.deeplab import DeepLabLargeFOV, DeepLabResNet101, build_segmenter, param_groups
from mcis_cli.stages import segment

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
COLOURS = {0: (110, 110, 110), 1: (220, 30, 30), 2: (30, 30, 220), 255: (110, 110, 110)}


@pytest.fixture(scope="module")
def painted(tmp_path_factory) -> tuple[Path, Path]:
    """A 48 px mask (disc 1, square 2, an ignore row) and a lossless image painted from it."""
    folder = tmp_path_factory.mktemp("painted")
    yy, xx = np.mgrid[:48, :48]
    mask = np.zeros((48, 48), np.uint8)
    mask[np.hypot(yy - 14, xx - 15) < 9] = 1
    mask[(abs(yy - 32) < 8) & (abs(xx - 33) < 8)] = 2
    mask[0] = 255
    lut = np.zeros((256, 3), np.uint8)
    for label, colour in COLOURS.items():
        lut[label] = colour
    Image.fromarray(lut[mask]).save(folder / "image.png")
    transforms.save_palette_png(folder / "mask.png", mask)
    return folder / "image.png", folder / "mask.png"


def _overrides(root: Path, tmp: Path, name: str, **extra) -> list[str]:
    """A few iterations of a 1/8-width model on 33 px crops; `name` picks the experiment."""
    values = {
        "name": name, "device": "cpu", "output_dir": str(tmp / "runs"), "data.root": str(root),
        "data.workers": 0, "segment.width": 0.125, "segment.pretrained": False,
        "segment.batch_size": 2, "segment.crop": 33, "segment.iters": 6, "segment.lr": 0.01,
        "segment.log_every": 1, "segment.val_every": 3, "segment.checkpoint_every": 3,
        "tracking.flush_every": 1,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


def _config(root: Path, tmp: Path, name: str, **extra):
    return load_config(TOY, _overrides(root, tmp, name, **extra))


# ---- schedule, crops, models --------------------------------------------------------------
def test_poly_lr_follows_the_deeplab_curve():
    assert segment.poly_lr(1e-3, 0, 15000, 0.9) == pytest.approx(1e-3)
    assert segment.poly_lr(1e-3, 7500, 15000, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    assert segment.poly_lr(1e-3, 14999, 15000, 0.9) == pytest.approx(1e-3 * (1 / 15000) ** 0.9)
    assert segment.poly_lr(0.01, 100, 100, 0.9) == 0.0
    values = [segment.poly_lr(0.01, i, 50, 0.9) for i in range(50)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_crop_at_scale_one_is_the_padded_image_and_mask(painted):
    original = torch.from_numpy(transforms.read_index_png(painted[1]).astype(np.int64))
    data = segment.CropDataset([painted], 3, SegmentCfg(crop=64, scales=[1.0]), seed=0)
    mirrored = set()
    for epoch in range(12):
        image, mask = data[(0, epoch)]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
        flip = not torch.equal(mask[:48, :48], original)
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        mirrored.add(flip)
        assert torch.equal(mask[:48, :48], original)  # labels and the ignore row kept exactly
        pad = torch.ones(64, 64, dtype=torch.bool)
        pad[:48, :48] = False
        assert (mask[pad] == 255).all()  # padding is ignore, never background
        assert (image[:, pad] == torch.tensor(transforms.MEAN_RGB).view(3, 1)).all()  # and the mean colour
        assert transforms.normalize(image)[:, pad].abs().max() < 0.03  # zero once normalised
    assert mirrored == {False, True}


def test_random_crops_keep_colours_on_their_labels(painted):
    seg = SegmentCfg(crop=40, scale_range=[0.7, 1.3])
    data = segment.CropDataset([painted], 3, seg, seed=0)
    scales_seen = set()
    for epoch in range(16):
        image, mask = data[(0, epoch)]
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}  # nearest: no blended labels
        rgb = image.float()
        for label in (1, 2):  # pixels of a pure label colour (off the blended edges) carry it
            pure = (rgb - torch.tensor(COLOURS[label]).view(3, 1, 1)).abs().amax(0) < 4
            assert (mask[pure] == label).all()
        scales_seen.add(int((mask == 1).sum()))
    assert len(scales_seen) > 4  # the scale really varies
    again = segment.CropDataset([painted], 3, seg, seed=0)[(0, 5)]
    assert torch.equal(again[0], data[(0, 5)][0])  # the key alone fixes the crop


def test_cached_pairs_give_the_crops_of_fresh_reads_decoded_once(painted, monkeypatch):
    reads = []
    real = transforms.load_image
    monkeypatch.setattr(transforms, "load_image", lambda path: (reads.append(path), real(path))[1])
    seg = SegmentCfg(crop=40, scale_range=[0.7, 1.3])
    cached = segment.CropDataset([painted], 3, seg, seed=0)
    crops = [cached[(0, epoch)] for epoch in range(8)]
    assert len(reads) == 1  # later epochs only augment
    fresh = segment.CropDataset([painted], 3, seg, seed=0, cache_mb=0)  # no room: every read decodes
    for epoch, (image, mask) in enumerate(crops):
        again = fresh[(0, epoch)]
        assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert len(reads) == 9 and not fresh.cache


def test_prepare_normalises_the_batch_as_each_image_was(painted):
    data = segment.CropDataset([painted], 3, SegmentCfg(crop=40), seed=0)
    images, masks = torch.utils.data.default_collate([data[(0, epoch)] for epoch in range(3)])
    x, y = segment.prepare(images, masks, torch.device("cpu"))
    for i in range(3):  # what transforms.to_tensor gave each crop before: the same bits
        assert torch.equal(x[i], transforms.to_tensor(images[i].permute(1, 2, 0).numpy()))
    assert x.dtype == torch.float32 and torch.equal(y, masks)


def test_crop_scales_are_the_listed_ones_or_the_range(painted, monkeypatch):
    drawn = []
    real = transforms.resize
    monkeypatch.setattr(transforms, "resize", lambda im, size, mode="bilinear": (
        drawn.append(size[0] / 48) if mode == "nearest" else None, real(im, size, mode))[1])
    listed = SegmentCfg(crop=32)  # official: one of 0.7, 0.8, ..., 1.3
    data = segment.CropDataset([painted], 3, listed, seed=0)
    for epoch in range(60):
        data[(0, epoch)]
    heights = {round(48 * s) for s in listed.scales}
    assert {round(48 * d) for d in drawn} == heights  # every listed scale, and only those
    drawn.clear()
    uniform = segment.CropDataset([painted], 3, SegmentCfg(crop=32, scales=[]), seed=0)
    for epoch in range(60):
        uniform[(0, epoch)]
    assert len({round(48 * d) for d in drawn}) > len(heights) and min(drawn) >= 0.69 and max(drawn) <= 1.31


def test_loss_norm_images_is_the_mean_of_per_image_means():
    logits = torch.zeros(3, 2, 2, 4)
    logits[:, 1] = 2.0  # every pixel: p(class 1) = sigmoid(2)
    masks = torch.full((3, 2, 4), 255)
    masks[0, 0, :3] = 0  # image 0: 3 valid pixels, all class 0
    masks[1] = 1  # image 1: 8 valid pixels, all class 1
    wrong, right = -np.log(1 - 1 / (1 + np.exp(-2.0))), -np.log(1 / (1 + np.exp(-2.0)))
    pooled = segment.pixel_loss(logits, masks, "pixels")
    assert float(pooled) == pytest.approx((3 * wrong + 8 * right) / 11, rel=1e-5)
    per_image = segment.pixel_loss(logits, masks, "images")
    assert float(per_image) == pytest.approx((wrong + right + 0) / 3, rel=1e-5)  # image 2: no valid
    # pixel adds 0 and still counts (Caffe divides by max(1, valid)); never NaN
    assert float(segment.pixel_loss(logits, torch.full_like(masks, 255), "images")) == 0.0
    assert float(segment.pixel_loss(logits[:2], masks[:2], "images")) == pytest.approx((wrong + right) / 2, rel=1e-5)


def test_local_weights_file_loads_and_bad_ones_are_one_line(tmp_path):
    seg = SegmentCfg(width=0.125, weights=str(tmp_path / "init.pth"))
    with pytest.raises(McisError, match="segment.weights file not found"):
        segment._load_weights(DeepLabLargeFOV(21, width=0.125), seg)
    source = DeepLabLargeFOV(5, width=0.125)  # another class count: the classifier is never read
    torch.save(source.state_dict(), seg.weights)
    model = DeepLabLargeFOV(21, width=0.125)
    classifier = model.classifier.weight.clone()
    segment._load_weights(model, seg)
    assert torch.equal(model.fc6.weight, source.fc6.weight)
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert torch.equal(model.classifier.weight, classifier)
    torch.save({k: v for k, v in source.state_dict().items() if k != "fc7.bias"}, seg.weights)
    with pytest.raises(McisError, match="lacks fc7.bias"):
        segment._load_weights(model, seg)
    torch.save(DeepLabLargeFOV(21, width=0.25).state_dict(), seg.weights)
    with pytest.raises(McisError, match="does not fit") as caught:
        segment._load_weights(model, seg)
    assert "\n" not in str(caught.value)


def test_epoch_sampler_shards_and_resumes_mid_stream():
    first = [key for _, key in zip(range(21), segment.EpochSampler(7, seed=3), strict=False)]
    assert sorted(i for i, e in first if e == 1) == list(range(7))  # every epoch is a permutation
    later = [key for _, key in zip(range(11), segment.EpochSampler(7, seed=3, start=10), strict=False)]
    assert later == first[10:21]
    shards = [[k for _, k in zip(range(8), segment.EpochSampler(7, 3, part=r, parts=2), strict=False)]
              for r in (0, 1)]
    assert {i for i, e in shards[0] + shards[1] if e == 0} == set(range(7))


@pytest.mark.parametrize("size", [(33, 47), (65, 41)])
def test_largefov_output_matches_odd_input_sizes(size):
    model = DeepLabLargeFOV(3, width=0.125).eval()
    x = torch.randn(2, 3, *size)
    assert model(x).shape == (2, 3, *size)
    assert model.features(x).shape[-2:] == tuple((s - 1) // 8 + 1 for s in size)  # output stride 8


def test_resnet101_forward_and_frozen_bn():
    model = build_segmenter(SegmentCfg(arch="resnet101"), 5)
    assert isinstance(model, DeepLabResNet101)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 25, 31)).shape == (1, 5, 25, 31)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(".bn" in name for name, _ in model.named_parameters())  # BN is buffers only
    assert model.fc6.dilation == (12, 12) and model.fc6.bias is None


def test_param_groups_follow_deeplab_multipliers():
    model = DeepLabLargeFOV(3, width=0.125)
    groups = {(g["lr_mult"], g["weight_decay"]): g["params"] for g in param_groups(model, 5e-4)}
    assert set(groups) == {(1.0, 5e-4), (2.0, 0.0), (10.0, 5e-4), (20.0, 0.0)}
    assert groups[(10.0, 5e-4)] == [model.classifier.weight]
    assert groups[(20.0, 0.0)] == [model.classifier.bias]
    assert any(p is model.fc6.bias for p in groups[(2.0, 0.0)])
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_largefov_loads_torchvision_vgg16_layout(batch_norm):
    from torchvision.models import vgg16, vgg16_bn

    state = (vgg16_bn if batch_norm else vgg16)().state_dict()
    model = DeepLabLargeFOV(21, batch_norm=batch_norm)
    model.load_imagenet(state)
    last = "features.40.weight" if batch_norm else "features.28.weight"  # conv5_3
    assert torch.equal(model.state_dict()[last], state[last])
    fc6 = state["classifier.0.weight"].view(4096, 512, 7, 7)[::4, :, ::3, ::3]
    assert torch.equal(model.fc6.weight, fc6)
    assert model.fc7.weight.shape == (1024, 1024, 1, 1)


# ---- stage runs ---------------------------------------------------------------------------
@pytest.mark.parametrize(("batch_norm", "needle"), [(False, "vgg16-397923af.pth"), (True, "vgg16_bn-6c64b313.pth")])
def test_pretrained_without_weights_file_is_a_clear_error(toy_root, store, monkeypatch, batch_norm, needle):
    monkeypatch.setenv("TORCH_HOME", str(store / "torch"))
    cfg = _config(toy_root, store, "pretrained", **{"segment.width": 1.0, "segment.pretrained": True,
                                                     "segment.batch_norm": batch_norm})
    with pytest.raises(McisError, match=needle):
        segment.run(cfg, labels="gt")


def test_segment_gt_run_logs_poly_lr_loss_and_model(toy_root, store):
    sets = [arg for item in _overrides(toy_root, store, "gt") for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["segment", "--labels", "gt", "--config", str(TOY), *sets])
    assert result.exit_code == 0, result.output
    run = tracking.find_runs(_config(toy_root, store, "gt"), "segment", **{"mcis.labels": "gt"})[0]
    mlc = tracking.client()
    lrs = sorted((m.step, m.value) for m in mlc.get_metric_history(run.run_id, "lr"))
    assert [s for s, _ in lrs] == list(range(6))
    assert [v for _, v in lrs] == pytest.approx([0.01 * (1 - i / 6) ** 0.9 for i in range(6)])
    assert len(mlc.get_metric_history(run.run_id, "loss")) == 6
    assert [m.step for m in mlc.get_metric_history(run.run_id, "val/miou")] == [3, 6]
    per_class = {k.removeprefix("val/iou/"): v for k, v in mlc.get_run(run.run_id).data.metrics.items()
                 if k.startswith("val/iou/")}
    assert "background" in per_class and len(per_class) > 1  # classes absent from val are left out
    assert all(0.0 <= v <= 1.0 for v in per_class.values())
    assert [m.step for m in mlc.get_metric_history(run.run_id, "val/iou/background")] == [3, 6]
    assert run.tags[tracking.SOURCE_TAG] == "" and run.tags[tracking.ROLE_TAG] == tracking.CEILING
    model, meta = artifacts.load_segmenter(run.fetch(artifacts.MODEL))
    names = ["background", *voc.class_names(toy_root)]
    assert meta["class_names"] == names and meta["num_classes"] == len(names)
    assert model(torch.zeros(1, 3, 29, 37)).shape == (1, len(names), 29, 37)
    cfg = _config(toy_root, store, "gt")  # the toy body travels with the file
    assert (meta["batch_norm"], meta["blocks"]) == (cfg.segment.batch_norm, cfg.segment.blocks)
    assert isinstance(model.features[1], torch.nn.BatchNorm2d) == cfg.segment.batch_norm


def test_pseudo_labels_come_from_the_pseudolabel_run(toy_root, store):
    cfg = _config(toy_root, store, "pseudo", **{"segment.iters": 2, "segment.val_every": 0})
    samples = voc.train_samples(cfg.data)
    with engine.stage_run(cfg, "pseudolabel") as tracker:
        for sample in samples[::2]:  # half the images get a mask
            mask = np.zeros(transforms.load_image(sample.image).shape[:2], np.uint8)
            transforms.save_palette_png(store / "pseudo" / f"{sample.id}.png", mask)
        tracker.log_artifacts(store / "pseudo", "pseudo")
        source = tracker.run_id
    result = segment.run(cfg, from_run=source)
    run = tracking.resolve_run(cfg, "segment", result.run_id)
    assert run.tags[tracking.SOURCE_TAG] == source and run.tags[tracking.LABELS_TAG] == "pseudo"
    assert run.metrics["train_images"] == len(samples[::2])
    assert run.metrics["skipped_images"] == len(samples[1::2])


def test_non_finite_loss_names_iteration_and_checkpoint(toy_root, store):
    cfg = _config(toy_root, store, "nan", **{"segment.lr": 1e6, "segment.iters": 30,
                                             "segment.val_every": 0, "segment.checkpoint_every": 1})
    with pytest.raises(McisError, match=r"at iteration \d+; last good checkpoint: .*last\.pt"):
        segment.run(cfg, labels="gt")


@pytest.mark.slow
def test_resume_ends_with_the_same_weights(toy_root, store, monkeypatch):
    cfg = _config(toy_root, store, "resume", deterministic=True)
    full = segment.run(cfg, labels="gt")
    save = training.save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        segment.run(cfg, labels="gt")
    monkeypatch.setattr(training, "save_checkpoint", save)
    mlc = tracking.client()
    killed = mlc.search_runs([tracking.experiment_id(mlc, cfg)], "attributes.status = 'KILLED'")
    resumed = segment.run(cfg, resume=killed[0].info.run_id)
    assert resumed.run_id == killed[0].info.run_id
    a = torch.load(full.outputs["model"], weights_only=True)["state_dict"]
    b = torch.load(resumed.outputs["model"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(m.step for m in mlc.get_metric_history(resumed.run_id, "lr")) == list(range(6))


@pytest.mark.slow
def test_two_process_gloo_run_trains(toy_root, store):
    port = str(random.randint(20000, 40000))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", port, "-m", "mcis_cli.cli", "segment", "--labels", "gt",
               "--config", str(TOY)]
    for item in _overrides(toy_root, store, "ddp", **{"segment.checkpoint_every": 2}):
        command += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tracking.find_runs(_config(toy_root, store, "ddp"), "segment")
    assert len(runs) == 1  # rank 1 opened no run of its own
    assert len(tracking.client().get_metric_history(runs[0].run_id, "loss")) == 6
    state = torch.load(runs[0].fetch(artifacts.LAST), weights_only=True)
    assert state["iteration"] == 4 and len(state["rng"]) == 2
    assert runs[0].fetch(artifacts.MODEL).is_file()


def test_a_corrupt_image_in_a_worker_is_one_line_naming_it(painted, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    data = segment.CropDataset([painted, (broken, painted[1])], 3, SegmentCfg(crop=32), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=segment.EpochSampler(2, 0),
                                         num_workers=1)
    with pytest.raises(McisError) as caught:
        segment._next_batch(iter(loader))
    assert "\n" not in str(caught.value) and str(broken) in str(caught.value)
