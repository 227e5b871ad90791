"""configs/voc12_vgg16.yaml end to end on a VOC-shaped synth tree (`mcis data synth --profile
voc`): the official recipe at full width, with only data.root and the step / image counts
changed, so every full-size path (VGG16 from torchvision's file layout, 321 crops of
VOC-sized images, 401 windows, ONNX at 321) runs once.

About 5 minutes on 2 CPU cores, so it is left out of the default run (pyproject addopts):
`make test-voc` or `pytest -m voc_profile` runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mcis_cli import artifacts, tracking
from mcis_cli.config import load_config
from mcis_cli.data import synth, transforms, voc
from mcis_cli.models.backbone import IMAGENET_WEIGHTS
from mcis_cli.stages import classify, evaluate, export, localize, pseudolabel, segment

REPO = Path(__file__).resolve().parents[1]
COUNTS = [  # steps and images only: every method setting is the official one
    "data.workers=0", "classify.epochs=1", "classify.batch_size=2", "classify.contrastive_from_epoch=0",
    "classify.log_every=1",
    "segment.batch_size=2", "segment.iters=2", "segment.log_every=1", "evaluate.overlays=2",
    "tracking.flush_every=1",
]


@pytest.mark.slow
@pytest.mark.voc_profile
def test_voc12_vgg16_runs_on_a_voc_shaped_tree(tmp_path, store, monkeypatch):
    root = tmp_path / "VOC2012"
    synth.write(root, profile="voc", seed=0, n_train=4, n_val=2)
    # torchvision's VGG16 file, randomly initialised: the real loading path, nothing downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    from torchvision.models import vgg16

    torch.save(vgg16().state_dict(), hub / IMAGENET_WEIGHTS)
    cfg = load_config(REPO / "configs/voc12_vgg16.yaml",
                      [f"data.root={root}", f"output_dir={tmp_path / 'runs'}", *COUNTS])
    assert (cfg.segment.crop, cfg.evaluate.window, cfg.evaluate.upsample) == (321, 401, "official")
    samples = voc.split_samples(root, "train_aug")
    shapes = {s.id: transforms.load_image(s.image).shape[:2] for s in samples}

    cls = classify.run(cfg)
    assert Path(cls.outputs["checkpoint"]).is_file() and np.isfinite(cls.metrics["train/loss"])
    loc = localize.run(cfg, from_run=cls.run_id)
    for sample in samples:
        maps, classes = artifacts.load_maps(artifacts.map_file(Path(loc.outputs[artifacts.MAPS]), sample.id))
        assert maps.shape == (len(sample.labels), *shapes[sample.id]) and list(classes) == list(sample.labels)
    pseudo = pseudolabel.run(cfg, from_run=loc.run_id)
    for sample in samples:
        mask = transforms.read_index_png(artifacts.mask_file(Path(pseudo.outputs[artifacts.PSEUDO]), sample.id))
        assert mask.shape == shapes[sample.id] and set(np.unique(mask)) <= {0, 255, *(c + 1 for c in sample.labels)}
    seg = segment.run(cfg, from_run=pseudo.run_id)
    assert np.isfinite(seg.metrics["loss"]) and 0 <= seg.metrics["val/miou"] <= 1
    scored = evaluate.run(cfg, from_run=seg.run_id)
    assert 0 <= scored.metrics["miou"] <= 1 and "miou_nocrf" in scored.metrics
    exported = export.run(cfg, from_run=seg.run_id, out=tmp_path / "model.onnx")
    assert exported.metrics["parity/max_abs_diff"] < cfg.export.tolerance

    mlc = MlflowClient(tracking.tracking_uri())
    logged = {result.run_id: mlc.get_run(result.run_id).data.metrics
              for result in (cls, loc, pseudo, seg, scored, exported)}
    assert len(mlc.get_metric_history(cls.run_id, "lr")) == 2  # 4 images / 2 pairs, one epoch
    assert [p.step for p in mlc.get_metric_history(seg.run_id, "lr")] == [0, 1]
    assert logged[loc.run_id]["maps/images"] == 4 and logged[pseudo.run_id]["pseudo/images"] == 4
    present = {voc.VOC_CLASSES[c] for s in voc.split_samples(root, "val") for c in s.labels}
    assert {f"iou/{name}" for name in ("background", *present)} <= set(logged[scored.run_id])
    assert mlc.get_run(seg.run_id).data.params["segment.loss_norm"] == "images"
