"""The MCIS classifier: shapes, gradients, the co-attention algebra, init, LR groups and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from mcis_cli.config import ClassifyCfg
from mcis_cli.errors import McisError
from mcis_cli.models.backbone import IMAGENET_WEIGHTS, VGG16D1, load_imagenet
from mcis_cli.models.mcis import MCISNet, mcis_loss, param_groups

K = 3


@pytest.fixture
def model() -> MCISNet:
    torch.manual_seed(0)
    return MCISNet(K, width=0.125)


def test_every_head_on_unequal_pair_sizes(model):
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 40)
    out = model(x1, x2)
    for key in ("s1", "s2", "t1", "t2", "u1", "u2"):
        assert out[key].shape == (2, K), key
    for key in ("cam1", "q1"):
        assert out[key].shape == (2, K, 4, 4), key
    for key in ("cam2", "q2"):
        assert out[key].shape == (2, K, 6, 5), key
    f1, f2 = model.features(x1), model.features(x2)
    g1, g2 = model.coattend(f1, f2)
    assert g1.shape == f1.shape and g2.shape == f2.shape
    assert model.gate(g2).shape == (2, 1, 6, 5)
    assert 0 < model.gate(g2).min() and model.gate(g2).max() < 1

    sum(v.sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_coattention_is_the_row_and_column_softmax_of_the_affinity(model):
    f1, f2 = torch.randn(1, 8, 3, 2), torch.randn(1, 8, 2, 4)  # N1 = 6, N2 = 8
    model.affinity = torch.nn.Linear(8, 8, bias=False)
    w, a, z = model.affinity.weight, f1.flatten(2)[0], f2.flatten(2)[0]
    s = torch.einsum("ai,ba,bj->ij", a, w, z)  # S = F1^T W^T F2
    g1 = torch.stack([(s[i].softmax(0) * z).sum(1) for i in range(6)], dim=1)
    g2 = torch.stack([(s[:, j].softmax(0) * a).sum(1) for j in range(8)], dim=1)
    got1, got2 = model.coattend(f1, f2)
    torch.testing.assert_close(got1[0].flatten(1), g1)
    torch.testing.assert_close(got2[0].flatten(1), g2)


def test_output_stride_and_torchvision_layer_indices():
    net = VGG16D1(width=1.0)
    reference = make_layers(cfgs["D"]).state_dict()
    assert {k: v.shape for k, v in net.features.state_dict().items()} == {
        k: v.shape for k, v in reference.items()
    }
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 8, 8)
    assert VGG16D1(0.125, pool3x3=True)(torch.zeros(1, 3, 65, 65)).shape == (1, 64, 9, 9)


def test_batch_norm_follows_torchvision_vgg16_bn_and_four_blocks_keep_stride_8():
    net = VGG16D1(width=1.0, batch_norm=True)
    reference = make_layers(cfgs["D"], batch_norm=True).state_dict()
    assert {k: v.shape for k, v in net.features.state_dict().items()} == {
        k: v.shape for k, v in reference.items()
    }
    short = VGG16D1(width=0.125, batch_norm=True, blocks=4)
    assert short(torch.zeros(2, 3, 64, 64)).shape == (2, 64, 8, 8)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in short.features) == 10  # conv1_1 .. conv4_3
    assert not any(isinstance(m, torch.nn.MaxPool2d) and m.stride == 1 for m in short.features)
    with pytest.raises(ValueError, match="blocks must be 4 or 5"):
        VGG16D1(blocks=3)
    bn = MCISNet(K, width=0.125, batch_norm=True, blocks=4)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.extra_convs) == 3


def test_cosine_affinity_is_the_scaled_cosine_of_detached_features():
    torch.manual_seed(0)
    net = MCISNet(K, width=0.125, affinity="cosine", temperature=0.2)
    assert net.affinity is None
    f1 = torch.randn(1, 8, 3, 2, requires_grad=True)
    f2 = torch.randn(1, 8, 2, 4, requires_grad=True)
    a, z = f1.flatten(2)[0], f2.flatten(2)[0]
    s = (F.normalize(a, dim=0).T @ F.normalize(z, dim=0)) / 0.2
    g1 = torch.stack([(s[i].softmax(0) * z).sum(1) for i in range(6)], dim=1)
    got1, got2 = net.coattend(f1, f2)
    torch.testing.assert_close(got1[0].flatten(1), g1.detach())
    # the attention weights carry no gradient: G1 is linear in F2 and constant in F1
    got1.sum().backward()
    assert f1.grad is None or f1.grad.abs().sum() == 0
    assert f2.grad.abs().sum() > 0
    copy = MCISNet.from_checkpoint({"state_dict": net.state_dict(), "num_classes": K, "width": 0.125,
                                    "affinity": "cosine", "temperature": 0.2})
    assert (copy.affinity_kind, copy.temperature) == ("cosine", 0.2)


def test_load_imagenet_reads_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(McisError, match=f"{IMAGENET_WEIGHTS}.*{tmp_path / 'checkpoints'}"):
        load_imagenet(VGG16D1())
    torch.manual_seed(1)
    features = make_layers(cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # fc layers are ignored
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / IMAGENET_WEIGHTS)
    net = VGG16D1()
    load_imagenet(net)
    torch.testing.assert_close(net.features[28].weight, features[28].weight)


def test_init_of_the_new_layers(model):
    c = model.backbone.out_channels
    conv = model.extra_convs[0]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * c)), rel=0.1)
    assert model.cam_head.bias.abs().sum() == 0
    assert model.coatt_head.bias is None and model.gate_head.bias is None


def test_param_groups_split_backbone_and_extra(model):
    groups = param_groups(model, 1e-3, [1, 2, 10, 20])
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 2e-3, 1e-2, 2e-2])
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    extra_weights = {id(p) for p in groups[2]["params"]}
    for p in (model.affinity.weight, model.coatt_head.weight, model.gate_head.weight,
              model.cam_head.weight, model.extra_convs[0].weight):
        assert id(p) in extra_weights
    assert all(id(p) not in extra_weights for p in model.backbone.parameters())


def _bce(z, y):
    """Mean sigmoid cross-entropy, written out (what multilabel_soft_margin_loss should equal)."""
    return -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()


def _batch():
    torch.manual_seed(2)
    x1 = torch.randn(2, 3, 32, 32)
    views = [x1.flip(3), F.interpolate(x1, size=24), F.interpolate(x1, size=64)]
    y1 = torch.tensor([[1.0, 0, 0], [1, 1, 0]])  # y1 is inside y2 for both pairs: no u1 term
    y2 = torch.tensor([[1.0, 0, 1], [1, 1, 0]])  # only the first pair has a unique label
    return {"x1": x1, "y1": y1, "x2": torch.randn(2, 3, 40, 32), "y2": y2, "views": views}


def test_loss_equals_a_hand_computation(model):
    cfg = ClassifyCfg(loss_weights={"cls": 1.0, "coatt": 0.5, "contrast": 2.0, "self": 0.25})
    batch = _batch()
    y1, y2 = batch["y1"], batch["y2"]
    total, parts = mcis_loss(model, batch, epoch=2, cfg=cfg)

    out = model(batch["x1"], batch["x2"])
    common = y1 * y2
    cls = _bce(torch.cat([out["s1"], out["s2"]]), torch.cat([y1, y2]))
    coatt = _bce(torch.cat([out["t1"], out["t2"]]), torch.cat([common, common]))
    contrast = _bce(out["u2"], y2 * (1 - y1))  # the whole batch, though pair 2 has no unique label
    self_pairs = 0
    for view in batch["views"]:
        o = model(batch["x1"], view)
        self_pairs = self_pairs + _bce(torch.cat([o["s1"], o["s2"]]), torch.cat([y1, y1]))
        self_pairs = self_pairs + _bce(torch.cat([o["t1"], o["t2"]]), torch.cat([y1, y1]))
    expected = {"cls": cls, "coatt": coatt, "contrast": contrast, "self": self_pairs}
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key], value, msg=key)
    torch.testing.assert_close(total, cls + 0.5 * coatt + 2.0 * contrast + 0.25 * self_pairs)


def test_contrastive_term_waits_for_its_epoch(model):
    cfg = ClassifyCfg(contrastive_from_epoch=2)
    total, parts = mcis_loss(model, _batch(), epoch=1, cfg=cfg)
    assert parts["contrast"].item() == 0.0
    total.backward()
    assert model.gate_head.weight.grad is None  # the gate only learns through the contrastive term
    _, later = mcis_loss(model, _batch(), epoch=2, cfg=cfg)
    assert later["contrast"].item() > 0


@pytest.mark.parametrize(
    ("settings", "terms"),
    [
        ({"method": "cam"}, {"cls"}),
        ({"coattention": False}, {"cls", "contrast", "self"}),
        ({"contrastive": False, "self_pairs": False}, {"cls", "coatt"}),
    ],
)
def test_switches_drop_terms(model, settings, terms):
    total, parts = mcis_loss(model, _batch(), epoch=5, cfg=ClassifyCfg(**settings))
    assert set(parts) == terms
    torch.testing.assert_close(total, sum(parts.values()))
