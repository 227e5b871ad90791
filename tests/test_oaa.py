"""OAA and OAA+ (docs/method.md "OAA and OAA+"): the rules on hand-made cases whose expected values
follow from the official formulas, then the two stages on the embedded data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from mcis_cli import artifacts, oaa, tracking
from mcis_cli.cli import app
from mcis_cli.config import PseudolabelCfg, load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import load_imagenet
from mcis_cli.models.mcis import param_groups
from mcis_cli.models.oaa import OAANet, iam_loss, normalise_attention, top_k_classes
from mcis_cli.stages import accumulate, integral
from mcis_cli.stages.accumulate import (
    accumulate_class,
    accumulating,
    quantise,
    res_maps,
    update_image,
)
from mcis_cli.stages.integral import iam_maps
from mcis_cli.stages.pseudolabel import saliency_labels
from tests.test_pipeline import tiny_config

TINY = {"input_size": 32, "epochs": 3, "decay_epochs": [2]}  # 48 toy images: 6 steps of 8 an epoch


# ---- the rules -------------------------------------------------------------------------------
def test_attention_is_relu_then_divided_by_its_max():
    maps = torch.tensor([[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -5.0]]])
    out = normalise_attention(maps)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # all negative: all 0 (the 1e-8 guard), no NaN


def test_quantise_rounds_as_the_store_writes_it():
    # x 255, then rounded: 0.25 -> 63.75 -> 64 (a truncation would give 63), 0.5 -> 127.5 -> 128
    out = quantise(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert out.dtype == np.uint8 and out.tolist() == [0, 64, 128, 191, 255]


def test_top_k_ranks_by_sigmoid_and_breaks_ties_by_class_id():
    # GT {0, 1}, k = 2; ranking [0, 2, 1, 3]: 0 is accepted, 1 is not
    assert top_k_classes(torch.tensor([2.0, 0.5, 1.0, -1.0]), 2) == [0, 2]
    # float32 sigmoid is 1.0 for 20 and 25 alike: a three-way tie, the lower ids win over class 2
    assert top_k_classes(torch.tensor([20.0, 20.0, 25.0, 0.0]), 2) == [0, 1]


def test_start_rule_and_max_fusion():
    assert not accumulating(0, 1) and accumulating(1, 1) and accumulating(14, 1)
    m1, m2, m3 = (np.array(v, np.uint8) for v in ([[255, 10], [0, 40]], [[100, 255], [30, 0]], [[0, 0], [255, 20]]))
    stored = None
    history = []
    for m in (m1, m2, m3):
        stored = accumulate_class(stored, m, accepted=True, fallback=False)
        history.append(stored)
    assert history[0] is m1  # the first accepted map is stored as it is
    assert stored.tolist() == [[255, 255], [255, 40]]  # the element-wise max of the three
    assert all((b >= a).all() for a, b in zip(history, history[1:], strict=False)) and stored.max() == 255
    assert accumulate_class(stored, m1 // 2, accepted=False, fallback=True) is stored  # rejected: unchanged
    assert accumulate_class(None, m2, accepted=False, fallback=False) is None
    assert accumulate_class(None, m2, accepted=False, fallback=True) is m2  # the last-epoch fallback


def _maps_ranking(order: list[int], k: int = 4, size: int = 2) -> torch.Tensor:
    """Class maps (k, size, size) whose GAP ranks the classes as `order` (first highest); class c's
    map is positive at the top-left pixel only, so its normalised map is known."""
    maps = torch.full((k, size, size), -1.0)
    for rank, c in enumerate(order):
        maps[c, 0, 0] = 4.0 * (k - rank)
    return maps


def test_top_k_filter_accumulates_the_ranked_class_and_falls_back_at_the_last_epoch(tmp_path):
    store = oaa.AttentionStore(tmp_path / "store")
    sample = voc.Sample("img", Path("img.jpg"), (0, 2))  # GT {a=0, b=2}
    update_image(store, sample, _maps_ranking([0, 1, 2, 3]), fallback=False)  # ranking [a, c, b, ...]
    maps, stored = store.get("img")
    assert stored.tolist() == [True, False]
    assert maps[0].tolist() == [[255, 0], [0, 0]] and maps[1].tolist() == [[0, 0], [0, 0]]
    update_image(store, sample, _maps_ranking([0, 1, 2, 3]), fallback=True)  # b never passed: the last epoch's map
    maps, stored = store.get("img")
    assert stored.tolist() == [True, True] and maps[1].tolist() == [[255, 0], [0, 0]]


def test_store_is_keyed_by_image_id_whatever_the_order(tmp_path):
    samples = [voc.Sample(f"im{i}", Path("x"), (i % 3,)) for i in range(4)]
    maps = {s.id: torch.randn(3, 3, 3) for s in samples}
    a, b = oaa.AttentionStore(tmp_path / "a"), oaa.AttentionStore(tmp_path / "b")
    for s in samples:
        update_image(a, s, maps[s.id], fallback=True)
    for s in reversed(samples):
        update_image(b, s, maps[s.id], fallback=True)
    assert a.snapshot() == b.snapshot() and len(a.snapshot()) == 4


def test_res_resize_is_bicubic_then_min_max_then_truncated():
    planes = np.array([[[0, 100], [200, 255]]], np.uint8)
    out = res_maps(planes, (2, 2))  # same size: the resize keeps the values
    # (x - 0) / (255 + 1e-8) * 255 truncates one grey level below x: 100 -> 99, 255 -> 254
    assert out.dtype == np.float32 and (out * 255).round().astype(int).tolist() == [[[0, 99], [199, 254]]]
    big = res_maps(np.array([[[0, 50, 255], [10, 0, 30]]], np.uint8), (11, 17))
    assert big.shape == (1, 11, 17) and big.min() == 0 and round(float(big.max()) * 255) == 254
    assert not res_maps(np.full((1, 2, 2), 80, np.uint8), (5, 5)).any()  # a constant map: all 0


def test_iam_inference_maps():
    maps = torch.tensor([[[-1.0, 1.0], [2.0, 4.0]]])
    out = iam_maps(maps, (2, 2))  # ReLU, / max, x 255 truncated: 0, 63.75 -> 63, 127.5 -> 127, 255
    assert (out * 255).round().astype(int).tolist() == [[[0, 63], [127, 255]]]
    assert iam_maps(maps, (7, 9)).shape == (1, 7, 9)


def test_iam_loss_values_and_gradients_match_the_formula():
    q = torch.tensor([[[0.0, 0.5], [1.0, 0.0005]], [[0.2, 0.0], [0.0, 0.0]]])  # P: 0.5, 1.0, 0.2
    zero = torch.zeros_like(q)
    # x = 0: L = mean_P(q) log 2 + log 2 (the N term is -log(0.5 + 1e-8))
    assert iam_loss(zero, q).item() == pytest.approx((0.5 + 1.0 + 0.2) / 3 * math.log(2) + math.log(2), rel=1e-6)
    x = torch.tensor([[[0.3, -1.2], [2.0, 0.7]], [[-0.4, 1.5], [0.1, -2.2]]], requires_grad=True)
    assert iam_loss(x, torch.zeros_like(q)).item() == pytest.approx(
        torch.nn.functional.softplus(x).mean().item(), abs=1e-6)  # all-zero targets: mean softplus
    iam_loss(x, q).backward()
    p = q > 0.001
    s = torch.sigmoid(x.detach())
    expected = torch.where(p, -q * (1 - s) / p.sum(), s / (~p).sum())
    assert torch.allclose(x.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        iam_loss(x, q[:, :1])


def test_oaa_gen_gt_thresholds_on_a_hand_made_image():
    """gen_gt.py with OAA's conflict 0.9 and att_thr 0.8, against MCIS's 0.99 / 0.95."""
    a, b, sal = np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32)
    a[:5, :5] = 1.0
    sal[:5, :5] = 1.0
    b[0, :5], b[0, 0], b[9, 9] = 0.92, 1.0, 0.85
    sal[8, 0] = 0.2  # 51 / 255 >= bg_thr 32
    maps, classes = np.stack([a, b]), (3, 7)
    base = PseudolabelCfg()
    own, mcis = saliency_labels(maps, classes, sal, base.for_method("oaa")), saliency_labels(maps, classes, sal, base)
    assert own[2, 2] == 4 and own[7, 0] == 0  # class 3 on its salient region; plain background
    assert own[0, 1] == 255 and mcis[0, 1] == 4  # both maps > 0.9: a conflict for OAA only
    assert own[8, 0] == 255  # background with sal >= 32: ignored
    assert own[9, 9] == 255 and mcis[9, 9] == 0  # map 0.85 > att_thr 0.8 raises sal_att
    tiny = np.zeros((1, 20, 20), np.float32)
    tiny[0, 0, 0] = 1.0  # one pixel in 400 is foreground: < 1%
    assert (saliency_labels(tiny, (0,), np.zeros((20, 20), np.float32), base.for_method("oaa+")) == 255).all()


def test_iam_targets_hold_the_gt_classes_maps_and_match_the_output_size(tmp_path):
    net = OAANet(20, width=0.125).eval()
    for size in [(375, 500), (500, 333), (224, 224), (281, 500)]:  # VOC aspect ratios
        h, w = oaa.short_side_size(size, 224)
        assert min(h, w) == 224
        with torch.no_grad():
            assert net(torch.zeros(1, 3, h, w)).shape[-2:] == oaa.feature_size((h, w)), size
    store = oaa.AttentionStore(tmp_path / "store")
    sample = voc.Sample("img", Path("img.jpg"), (4, 11))
    store.put("img", np.array([[[255, 0, 51]], [[0, 102, 0]]], np.uint8), np.array([True, True]))
    q = integral.targets(store, sample, 20, (1, 3))
    assert q.shape == (20, 1, 3)
    assert torch.allclose(q[4], torch.tensor([[1.0, 0.0, 0.2]])) and torch.allclose(q[11], torch.tensor([[0.0, 0.4, 0.0]]))
    assert not q[[c for c in range(20) if c not in (4, 11)]].any()  # absent classes: 0, all negative pixels
    with pytest.raises(McisError, match="at the accumulate run's input size"):
        integral.targets(store, sample, 20, (2, 3))


# ---- the network -----------------------------------------------------------------------------
def test_network_shape_layers_init_and_param_groups():
    torch.manual_seed(0)
    net = OAANet(20)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 17  # 13 VGG + 3 extra 3x3 + the 1x1
    assert [c.dilation for c in convs if c.dilation != (1, 1)] == [(2, 2)] * 3  # conv5_x only
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 20 and convs[-1].bias is not None
    assert abs(convs[-2].weight.std().item() - 0.01) < 1e-3 and not convs[-2].bias.any()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 20, 28, 28)
    groups = param_groups(net, 1e-3, [1.0, 2.0, 10.0, 20.0])
    assert [len(g["params"]) for g in groups] == [13, 13, 4, 4] and [g["lr"] for g in groups] == [1e-3, 2e-3, 1e-2, 2e-2]


def test_imagenet_weights_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(McisError, match="ImageNet VGG16 weights not found: put torchvision's vgg16-397923af.pth"):
        load_imagenet(OAANet(20, width=1.0).backbone)


# ---- the stages ------------------------------------------------------------------------------
def _store(folder: Path) -> dict[str, list[np.ndarray]]:
    out = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as data:
            out[path.name] = [data[k] for k in sorted(data.files)]
    return out


def _same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> bool:
    return a.keys() == b.keys() and all(
        all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def test_accumulate_resumes_with_its_checkpointed_maps(tmp_path, toy_root, store, monkeypatch):
    straight = load_config(tiny_config(tmp_path, toy_root, "oaa_straight", accumulate=TINY))
    done = accumulate.run(straight)
    folder = Path(done.outputs[artifacts.ACCUMULATED])
    expected = _store(folder)
    assert len(expected) == 48  # every image has its cumulative maps
    run = MlflowClient(tracking.tracking_uri()).get_run(done.run_id)
    assert run.data.tags[tracking.METHOD_TAG] == "oaa" and run.data.metrics["accumulate/stored_frac"] == 1.0
    assert [p.step for p in MlflowClient(tracking.tracking_uri()).get_metric_history(done.run_id, "lr")] == list(range(3 * 6))

    cfg = load_config(tiny_config(tmp_path, toy_root, "oaa_killed", accumulate=TINY))
    real, calls = accumulate.update_image, []

    def dies_in_epoch_2(*args, **kwargs):  # epoch 0 stores nothing; 48 images in epoch 1, 20 more
        calls.append(1)
        if len(calls) == 48 + 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(accumulate, "update_image", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        accumulate.run(cfg)
    monkeypatch.setattr(accumulate, "update_image", real)
    resumed = accumulate.run(cfg)  # the KILLED run, continued from its epoch-1 checkpoint
    [killed] = tracking.find_runs(cfg, "accumulate")
    assert killed.run_id == resumed.run_id
    assert _same(_store(Path(resumed.outputs[artifacts.ACCUMULATED])), expected)
    for sample in voc.train_samples(straight.data):
        a, _ = artifacts.load_maps(artifacts.map_file(Path(done.outputs[artifacts.MAPS]), sample.id))
        b, _ = artifacts.load_maps(artifacts.map_file(Path(resumed.outputs[artifacts.MAPS]), sample.id))
        assert np.array_equal(a, b), sample.id


def test_integral_trains_on_an_accumulate_run_and_refuses_bad_input(tmp_path, toy_root, store):
    config = tiny_config(tmp_path, toy_root, "oaa_plus", accumulate=TINY, integral={**TINY, "epochs": 2})
    runner = CliRunner()
    missing = runner.invoke(app, ["integral", "--config", str(config)])
    assert missing.exit_code == 2 and "no finished accumulate run" in missing.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing written

    made = runner.invoke(app, ["accumulate", "--config", str(config)])
    assert made.exit_code == 0, made.output
    done = runner.invoke(app, ["integral", "--config", str(config)])
    assert done.exit_code == 0, done.output
    cfg = load_config(config)
    [source] = tracking.find_runs(cfg, "accumulate")
    [run] = tracking.find_runs(cfg, "integral")
    assert run.tags[tracking.METHOD_TAG] == "oaa+" and run.tags[tracking.SOURCE_TAG] == source.run_id
    assert 0 < run.metrics["maps/miou"] <= 1 and run.metrics["maps/images"] == 48
    history = MlflowClient(tracking.tracking_uri()).get_metric_history(run.run_id, "loss/total")
    assert len(history) == 2 * 6 and all(math.isfinite(p.value) for p in history)

    runs_before = len(list((tmp_path / "runs").iterdir()))
    wrong = runner.invoke(app, ["integral", "--config", str(config), "--from-run", run.run_id])
    assert wrong.exit_code == 2 and "is a 'integral' run; this command needs a accumulate run" in wrong.stderr
    size = runner.invoke(app, ["integral", "--config", str(config), "--set", "integral.input_size=48"])
    assert size.exit_code == 2 and "set integral.input_size=32" in size.stderr
    assert [sum(line.startswith('error:') for line in r.stderr.splitlines()) for r in (wrong, size)] == [1, 1]
    assert len(list((tmp_path / "runs").iterdir())) == runs_before


def test_pipeline_compares_cam_oaa_oaa_plus_and_mcis(tmp_path, toy_root, store):
    config = tiny_config(tmp_path, toy_root, "oaa_compare", accumulate=TINY, integral={**TINY, "epochs": 2})
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), "--methods", "cam,oaa,oaa+,mcis"])
    assert result.exit_code == 0, result.output
    mlc = MlflowClient(tracking.tracking_uri())
    experiment = mlc.get_experiment_by_name("oaa_compare")
    runs = mlc.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = {r.data.tags[tracking.STEP_TAG]: r for r in runs if tracking.STEP_TAG in r.data.tags}
    assert {"oaa/accumulate", "oaa+/integral", "oaa/pseudolabel", "oaa+/pseudolabel", "oaa+/evaluate"} <= set(steps)
    assert not any(name.startswith("oaa+/accumulate") for name in steps)  # OAA's run serves both
    for name, run in steps.items():
        method = name.split("/")[0]
        if method in ("cam", "oaa", "oaa+", "mcis"):
            assert run.data.tags[tracking.METHOD_TAG] == method, name
    assert steps["oaa+/integral"].data.tags[tracking.SOURCE_TAG] == steps["oaa/accumulate"].info.run_id
    for name, rule in [("oaa", ("0.9", "0.8")), ("oaa+", ("0.9", "0.8")), ("mcis", ("0.99", "0.95"))]:
        params = steps[f"{name}/pseudolabel"].data.params  # OAA's own gen_gt thresholds for OAA's maps
        assert (params["rule.conflict"], params["rule.att_thr"]) == rule, name
    for key in ("maps_miou", "pseudo_miou", "seg/miou"):
        for prefix in ("oaa", "oaa_plus", "cam", "mcis"):
            assert f"{prefix}/{key}" in parent.data.metrics, (prefix, key)


def _trainer_after_one_epoch(tmp_path, toy_root, **switches):
    """The toy OAA classifier after epoch 0 on 3 images at iter_size 2 (one step, one image left
    over), plain SGD at a rate that makes the step large beside float32 rounding; returns (trainer, dataset, loss, the step's change of each parameter)."""
    cfg = load_config(tiny_config(tmp_path, toy_root, "oaa_iter", accumulate={
        **TINY, "batch_size": 1, "iter_size": 2, "optimizer": "sgd", "lr": 10.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
        "color_jitter": [0.0, 0.0, 0.0, 0.0], "carry_partial_step": switches.get("carry", True)}))
    c = cfg.accumulate
    samples = voc.train_samples(cfg.data)[:3]
    torch.manual_seed(0)
    trainer = oaa.OaaTrainer("accumulate", cfg, c, 20, torch.device("cpu"), switches.get("divide", True))
    dataset = oaa.OaaDataset(samples, 20, c, cfg.seed)

    def loss(maps, batch):
        return torch.nn.functional.multilabel_soft_margin_loss(maps.mean((2, 3)), batch["y"])

    start = [p.detach().clone() for p in trainer.model.parameters()]
    with trainer.progress(1, 0, c.lr):
        step, _ = trainer.train_epoch(oaa.loader(dataset, cfg, c, trainer.device), 0, 0, None, loss)
    assert step == 1  # 3 forwards at iter_size 2: one step
    return trainer, dataset, loss, [p.detach() - s for p, s in zip(trainer.model.parameters(), start, strict=True)]


def test_an_epochs_incomplete_step_is_carried_into_the_next_as_the_official_code(tmp_path, toy_root):
    trainer, dataset, loss, change = _trainer_after_one_epoch(tmp_path, toy_root)
    carried = [g.clone() for g in trainer.carried()]
    # the third image's gradient at the weights after the step, / iter_size, is what is left
    trainer.optimizer.zero_grad(set_to_none=True)
    item = dataset[2]
    x = transforms.normalize(item["x"][None])
    (loss(trainer.model(x), {"y": item["y"][None]}) / 2).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(carried, trainer.model.parameters(), strict=True))

    dropped = _trainer_after_one_epoch(tmp_path, toy_root, carry=False)[0]
    assert all(g is None for g in dropped.carried())
    # integral's loss_sum_over_iter: the step sums the 2 images' gradients, twice the mean's step
    summed = _trainer_after_one_epoch(tmp_path, toy_root, divide=False)[3]
    assert any(d.abs().max() > 0 for d in change)
    assert all(torch.allclose(2 * a, b, rtol=1e-3, atol=1e-6) for a, b in zip(change, summed, strict=True))
