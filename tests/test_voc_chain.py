"""configs/voc12_vgg16.yaml and configs/voc12_resnet101.yaml end to end on a VOC-shaped synth tree
(`mcis data synth --profile voc`): the official recipe at full width, with only data.root and the
step / image counts changed, so every full-size path (torchvision's weight files, 321 crops of
VOC-sized images, 401 windows, 5 scales + flip + CRF, ONNX at 321) runs once.

Minutes on 2 CPU cores: `make test` and CI run them, `make test-fast` leaves them out (slow),
`make test-voc` runs only these."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torchvision.models import resnet101, vgg16

from mcis_cli import artifacts, tracking
from mcis_cli.config import load_config
from mcis_cli.data import synth, transforms, voc
from mcis_cli.models.backbone import IMAGENET_WEIGHTS
from mcis_cli.stages import (
    accumulate,
    affinity,
    classify,
    evaluate,
    export,
    integral,
    localize,
    psa_cam,
    psa_classify,
    pseudolabel,
    refine,
    segment,
)
from mcis_cli.stages.segment import RESNET101_WEIGHTS

pytestmark = [pytest.mark.slow, pytest.mark.voc_profile]

REPO = Path(__file__).resolve().parents[1]
COUNTS = [  # steps and images only: every method setting is the official one
    "data.workers=0", "classify.epochs=1", "classify.batch_size=2", "classify.contrastive_from_epoch=0",
    "classify.log_every=1",
    "segment.batch_size=2", "segment.iters=2", "segment.log_every=1", "evaluate.overlays=2",
    "tracking.flush_every=1",
    "psa.epochs=1", "psa.batch_size=2", "psa.log_every=1",
    "affinity.epochs=1", "affinity.batch_size=2", "affinity.log_every=1",
]


def calibrated_resnet101() -> dict[str, torch.Tensor]:
    """torchvision's resnet101 with random weights, standing in for the ImageNet file. The segmenter
    freezes BatchNorm, as the recipe does, and trusts the file's statistics: a fresh model's
    (mean 0, var 1) let the activations grow block after block (logits ~1e4), and even measured
    ones leave random convs under frozen BN diverging at the recipe's lr within 3 steps (logits
    ~1e3). So the statistics are measured on noise, and each residual branch ends in a zero BN
    scale (torchvision's zero_init_residual): every block starts as its identity path, and
    training stays finite, as it does from trained weights."""
    torch.manual_seed(0)
    net = resnet101(zero_init_residual=True)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 129, 129))
    return net.state_dict()


@pytest.fixture(scope="module")
def tree(tmp_path_factory, store):
    """4 train + 2 val VOC-sized images and torchvision's weight files (randomly initialised) where
    torchvision keeps them: the real loading path, nothing downloaded."""
    tmp = tmp_path_factory.mktemp("voc_chain")
    root = tmp / "VOC2012"
    synth.write(root, profile="voc", seed=0, n_train=4, n_val=2)
    hub = tmp / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(vgg16().state_dict(), hub / IMAGENET_WEIGHTS)
    torch.save(calibrated_resnet101(), hub / RESNET101_WEIGHTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp / "torch"))
        yield SimpleNamespace(root=root, tmp=tmp)


def config(tree, name: str, *counts: str):
    return load_config(REPO / f"configs/{name}.yaml",
                       [f"data.root={tree.root}", f"output_dir={tree.tmp / 'runs'}", *COUNTS, *counts])


@pytest.fixture(scope="module")
def labelled(tree):
    """classify -> localize -> pseudolabel of voc12_vgg16 (voc12_resnet101 shares these sections)."""
    cfg = config(tree, "voc12_vgg16")
    cls = classify.run(cfg)
    loc = localize.run(cfg, from_run=cls.run_id)
    return SimpleNamespace(cls=cls, loc=loc, pseudo=pseudolabel.run(cfg, from_run=loc.run_id))


def test_voc12_labels_have_the_images_sizes(tree, labelled):
    cfg = config(tree, "voc12_vgg16")
    assert config(tree, "voc12_resnet101").pseudolabel == cfg.pseudolabel
    samples = voc.split_samples(tree.root, "train_aug")
    shapes = {s.id: transforms.load_image(s.image).shape[:2] for s in samples}
    assert len(set(shapes.values())) > 1  # VOC's varied sizes, not one

    cls, loc, pseudo = labelled.cls, labelled.loc, labelled.pseudo
    assert Path(cls.outputs["checkpoint"]).is_file() and np.isfinite(cls.metrics["train/loss"])
    for sample in samples:
        maps, classes = artifacts.load_maps(artifacts.map_file(Path(loc.outputs[artifacts.MAPS]), sample.id))
        assert maps.shape == (len(sample.labels), *shapes[sample.id]) and list(classes) == list(sample.labels)
        mask = transforms.read_index_png(artifacts.mask_file(Path(pseudo.outputs[artifacts.PSEUDO]), sample.id))
        assert mask.shape == shapes[sample.id] and set(np.unique(mask)) <= {0, 255, *(c + 1 for c in sample.labels)}

    mlc = MlflowClient(tracking.tracking_uri())
    assert len(mlc.get_metric_history(cls.run_id, "lr")) == 2  # 4 images / 2 pairs, one epoch
    assert mlc.get_run(cls.run_id).data.params["classify.width"] == "1.0"
    assert mlc.get_run(loc.run_id).data.metrics["maps/images"] == 4
    assert mlc.get_run(pseudo.run_id).data.metrics["pseudo/images"] == 4


@pytest.mark.parametrize("name, arch", [("voc12_vgg16", "vgg16"), ("voc12_resnet101", "resnet101")])
def test_voc12_segmenter_trains_scores_and_exports(tree, labelled, name, arch):
    cfg = config(tree, name)
    assert (cfg.segment.arch, cfg.segment.crop, cfg.evaluate.window) == (arch, 321, 401)
    assert (cfg.segment.loss_norm, cfg.evaluate.upsample, cfg.evaluate.crf) == ("images", "official", True)
    seg = segment.run(cfg, from_run=labelled.pseudo.run_id)
    assert np.isfinite(seg.metrics["loss"]) and 0 <= seg.metrics["val/miou"] <= 1
    scored = evaluate.run(cfg, from_run=seg.run_id)
    assert 0 <= scored.metrics["miou"] <= 1 and "miou_nocrf" in scored.metrics
    exported = export.run(cfg, from_run=seg.run_id, out=tree.tmp / f"{name}.onnx")
    assert exported.metrics["parity/max_abs_diff"] < cfg.export.tolerance

    mlc = MlflowClient(tracking.tracking_uri())
    assert [p.step for p in mlc.get_metric_history(seg.run_id, "lr")] == [0, 1]
    params = mlc.get_run(seg.run_id).data.params
    assert (params["segment.arch"], params["segment.loss_norm"]) == (arch, "images")
    present = {voc.VOC_CLASSES[c] for s in voc.split_samples(tree.root, "val") for c in s.labels}
    logged = mlc.get_run(scored.run_id).data.metrics
    assert {f"iou/{c}" for c in ("background", *present)} <= set(logged)


def test_voc12_psa_chain_at_full_width(tree):
    """PSA's four stages with the VOC recipe: 448 crops, 4 scales x flip, the two 10-iteration
    CRFs, AffinityNet at radius 5, the dense walk of VOC-sized images, the walk's masks."""
    cfg = config(tree, "voc12_vgg16")
    assert (cfg.psa.crop, cfg.affinity.radius, cfg.refine.logt, cfg.affinity.crf.iters) == (448, 5, 8, 10)
    trained = psa_classify.run(cfg)
    cams = psa_cam.run(cfg, from_run=trained.run_id)
    aff = affinity.run(cfg, from_run=cams.run_id)
    walked = refine.run(cfg, from_run=cams.run_id, affinity_run=aff.run_id)
    masks = pseudolabel.run(cfg, from_run=walked.run_id)
    mlc = MlflowClient(tracking.tracking_uri())
    for run in (trained, aff):
        assert np.isfinite(run.metrics["train/loss"])
        assert len(mlc.get_metric_history(run.run_id, "lr")) == 2  # 4 images, batches of 2, one epoch
    assert mlc.get_run(trained.run_id).data.params["psa.width"] == "1.0"
    for sample in voc.split_samples(tree.root, "train_aug"):
        size = transforms.load_image(sample.image).shape[:2]
        path = artifacts.map_file(Path(walked.outputs[artifacts.MAPS]), sample.id)
        maps, classes = artifacts.load_maps(path)
        assert maps.shape == (len(sample.labels), *size) and artifacts.load_background(path).shape == size
        mask = transforms.read_index_png(artifacts.mask_file(Path(masks.outputs[artifacts.PSEUDO]), sample.id))
        assert mask.shape == size and set(np.unique(mask)) <= {0, *(c + 1 for c in sample.labels)}


OAA_COUNTS = [  # epoch 0 stores nothing, epoch 1 (the last) accumulates; 4 images at iter_size 3
    "accumulate.epochs=2", "accumulate.iter_size=3", "accumulate.log_every=1",  # leave one image over
    "integral.epochs=1", "integral.iter_size=3", "integral.log_every=1",
]


def test_voc12_oaa_and_oaa_plus_make_maps_at_the_images_sizes(tree):
    cfg = config(tree, "voc12_vgg16", *OAA_COUNTS)
    for c in (cfg.accumulate, cfg.integral):  # the official recipe, at full width from the weights file
        assert (c.width, c.batch_size, c.input_size, c.pretrained, c.blocks) == (1.0, 1, 224, True, 5)
    acc = accumulate.run(cfg)
    plus = integral.run(cfg, from_run=acc.run_id)
    pseudo = pseudolabel.run(cfg, from_run=plus.run_id)
    samples = voc.split_samples(tree.root, "train_aug")
    for sample in samples:
        shape = transforms.load_image(sample.image).shape[:2]
        for run in (acc, plus):
            maps, classes = artifacts.load_maps(artifacts.map_file(Path(run.outputs[artifacts.MAPS]), sample.id))
            assert maps.shape == (len(sample.labels), *shape) and list(classes) == list(sample.labels)
            assert 0 <= maps.min() and maps.max() <= 1
        mask = transforms.read_index_png(artifacts.mask_file(Path(pseudo.outputs[artifacts.PSEUDO]), sample.id))
        assert mask.shape == shape

    mlc = MlflowClient(tracking.tracking_uri())
    assert [p.step for p in mlc.get_metric_history(acc.run_id, "lr")] == [0, 1]  # 4 // 3 steps an epoch
    assert mlc.get_run(acc.run_id).data.metrics["accumulate/stored_frac"] == 1.0  # the last-epoch fallback
    assert len(mlc.get_metric_history(plus.run_id, "lr")) == 1
    params = mlc.get_run(pseudo.run_id).data.params
    assert (params["rule.conflict"], params["rule.att_thr"]) == ("0.9", "0.8")
    assert mlc.get_run(plus.run_id).data.tags[tracking.METHOD_TAG] == "oaa+"
