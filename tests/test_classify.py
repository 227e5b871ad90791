"""The classify stage: data, sharding, mAP, tracking, checkpoints, resume, DDP and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from mcis_cli import tracking
from mcis_cli.checkpoints import load_checkpoint
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.data import voc
from mcis_cli.data.pairs import PairSampler
from mcis_cli.errors import McisError
from mcis_cli.models.mcis import MCISNet, build_classifier
from mcis_cli.stages import classify

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "toy.yaml"


def _overrides(root: Path, tmp: Path, name: str, **extra) -> list[str]:
    """Two epochs of three steps (48 images, 16 pairs a step) of a 1/8-width model at 32 px."""
    values = {
        "name": name, "device": "cpu", "output_dir": str(tmp / "runs"), "data.root": str(root),
        "data.workers": 0, "classify.width": 0.125, "classify.pretrained": False,
        "classify.input_size": 32, "classify.batch_size": 16, "classify.epochs": 2, "classify.lr": 0.01,
        "classify.decay_epochs": [1], "classify.checkpoint_epoch": 0,
        "classify.contrastive_from_epoch": 1, "classify.log_every": 1, "tracking.flush_every": 1,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


def _config(root: Path, tmp: Path, name: str, **extra):
    return load_config(TOY, _overrides(root, tmp, name, **extra))


# ---- pieces ---------------------------------------------------------------------------------
def test_items_carry_partner_views_and_deterministic_jitter(toy_root):
    cfg = load_config(TOY, [f"data.root={toy_root}", "classify.input_size=32"])
    samples = voc.train_samples(cfg.data)
    k = len(voc.class_names(toy_root))
    data = classify.ClassifyDataset(samples, k, cfg.classify, seed=0, train=True)
    data.set_epoch(3)
    item = data[5]
    assert item["x1"].shape == item["x2"].shape == (3, 32, 32)
    assert [v.shape[1:] for v in item["views"]] == [(32, 32), (24, 24), (64, 64)]
    partner = samples[data.partners[5]]
    assert set(samples[5].labels) & set(partner.labels)  # pairs share a class
    assert item["y2"].nonzero().flatten().tolist() == list(partner.labels)
    torch.testing.assert_close(data[5]["x1"], item["x1"])  # same (seed, epoch, index), same jitter
    data.set_epoch(4)
    assert not torch.equal(data[5]["x1"], item["x1"])
    val = classify.ClassifyDataset(samples, k, cfg.classify, seed=0, train=False)
    val.set_epoch(0)
    assert set(val[5]) == {"x1", "y1"}


def test_ranks_split_each_global_batch():
    sampler = PairSampler([[i % 3] for i in range(23)], seed=1)
    single = classify.epoch_batches(sampler, 2, 6, part=0, parts=1)
    ranks = [classify.epoch_batches(sampler, 2, 6, part=r, parts=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4
    for k, batch in enumerate(single):
        shared = sorted(ranks[0][k] + ranks[1][k])
        assert len(ranks[0][k]) == len(ranks[1][k])
        assert set(batch) <= set(shared) and len(shared) - len(batch) == (k == 3)  # padded to even
    assert sorted(sum(single, [])) == list(range(23))


def test_mean_average_precision_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.3).astype(np.float32)
    labels[:, 4] = 0  # a class without positives is left out
    scores = rng.normal(size=(40, 5)) + 2 * labels
    expected = np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in range(4)])
    assert classify.mean_average_precision(scores, labels) == pytest.approx(expected)


# ---- stage runs ---------------------------------------------------------------------------
def test_classify_command_logs_params_histories_and_checkpoint(toy_root, store):
    args = ["classify", "--config", str(TOY)]
    for item in _overrides(toy_root, store, "cli"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tracking.resolve_run(_config(toy_root, store, "cli"), "classify")
    mlc = tracking.client()
    params = mlc.get_run(run.run_id).data.params
    assert params["classify.batch_size"] == "16" and params["world_size"] == "1"
    assert params["effective_batch"] == "16" and run.tags["mcis.method"] == "mcis"
    lrs = sorted((m.step, m.value) for m in mlc.get_metric_history(run.run_id, "lr"))
    assert lrs == [(s, pytest.approx(0.01 if s < 3 else 0.001)) for s in range(6)]
    for term in ("total", "cls", "coatt", "contrast", "self"):
        assert len(mlc.get_metric_history(run.run_id, f"loss/{term}")) == 6, term
    contrast = sorted((m.step, m.value) for m in mlc.get_metric_history(run.run_id, "loss/contrast"))
    assert [v for s, v in contrast if s < 3] == [0, 0, 0] and any(v > 0 for s, v in contrast if s >= 3)
    assert [m.step for m in mlc.get_metric_history(run.run_id, "val/mAP")] == [0, 1]
    assert 0 < run.metrics["val/mAP"] <= 1

    checkpoint = load_checkpoint(run.fetch("checkpoints/model.pt"))
    assert checkpoint["input_size"] == 32 and checkpoint["method"] == "mcis"
    model = MCISNet.from_checkpoint(checkpoint)
    assert model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 40, 24))["q2"].shape[2:] == (5, 3)
    local = store / "runs" / run.run_id / "checkpoints"
    epoch0 = load_checkpoint(local / "epoch_0.pt")["state_dict"]
    assert all(torch.equal(epoch0[k], v) for k, v in checkpoint["state_dict"].items())
    assert load_checkpoint(run.fetch("checkpoints/last.pt"))["epoch"] == 1


def test_resume_from_artifacts_ends_with_the_same_weights(toy_root, store, monkeypatch):
    cfg = _config(toy_root, store, "resume", deterministic=True)
    full = classify.run(cfg)
    validate = classify.Trainer.validate

    def die_in_second_epoch(self, loader):
        if self.optimizer.param_groups[0]["lr"] < cfg.classify.lr:  # epoch 1 has the decayed lr
            raise KeyboardInterrupt
        return validate(self, loader)

    monkeypatch.setattr(classify.Trainer, "validate", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        classify.run(cfg)
    monkeypatch.setattr(classify.Trainer, "validate", validate)
    mlc = tracking.client()
    killed = mlc.search_runs([tracking.experiment_id(mlc, cfg)], "attributes.status = 'KILLED'")
    run_id = killed[0].info.run_id
    (store / "runs" / run_id / "checkpoints" / "last.pt").unlink()  # fetched from the artifacts
    changed = _config(toy_root, store, "resume", deterministic=True, **{"classify.lr": 0.001})
    with pytest.raises(McisError, match="classify.lr is 0.01 in that run"):  # params would lie
        classify.run(changed, resume=run_id)
    resumed = classify.run(cfg, resume=run_id)
    assert resumed.run_id == run_id and resumed.metrics["steps"] == 6
    a = load_checkpoint(store / "runs" / full.run_id / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(store / "runs" / run_id / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mlc.get_run(run_id).info.status == "FINISHED"


def test_non_finite_loss_names_the_step_and_checkpoint(toy_root, store, monkeypatch):
    loss = classify.mcis_loss

    def poisoned(model, batch, epoch, cfg):
        total, parts = loss(model, batch, epoch, cfg)
        return total * (float("nan") if epoch == 1 else 1.0), parts

    monkeypatch.setattr(classify, "mcis_loss", poisoned)
    with pytest.raises(McisError, match=r"at step 3 \(epoch 1\); last good checkpoint: .*last\.pt"):
        classify.run(_config(toy_root, store, "nan", **{"classify.self_pairs": False}))


@pytest.mark.parametrize(("width", "batch_norm", "needle"), [
    (1.0, False, "vgg16-397923af.pth"), (1.0, True, "vgg16_bn-6c64b313.pth"), (0.125, True, "width=1")])
def test_pretrained_errors_are_one_line(toy_root, store, monkeypatch, width, batch_norm, needle):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(store / "hub"))
    args = ["classify", "--config", str(TOY)]
    for item in _overrides(toy_root, store, "pretrained", **{"classify.pretrained": True,
                                                              "classify.width": width,
                                                              "classify.batch_norm": batch_norm}):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and needle in result.output
    assert "Traceback" not in result.output
    if width == 1.0:
        assert str(store / "hub" / "checkpoints") in result.output.replace("\n", "")


@pytest.mark.slow
def test_two_process_gloo_step_equals_one_process_on_the_global_batch(toy_root, store):
    """One step of 48 pairs: 2 ranks x 24 under DDP must give the weights of 1 process x 48.
    With the official options: on CPU BatchNorm normalises each rank's batch by itself, and
    AdamW's first step (m / sqrt(v)) turns summation-order noise in near-zero gradients into
    full-size updates."""
    extra = {"classify.batch_size": 48, "classify.epochs": 1, "classify.contrastive_from_epoch": 0,
             "classify.batch_norm": False, "classify.optimizer": "sgd", "tracking.system_metrics": 0.1}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outcomes = {}
    for name, launcher in (("one", []), ("ddp", ["-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node", "2"])):
        command = [sys.executable, *launcher, "-m", "mcis_cli.cli", "classify", "--config", str(TOY)]
        for item in _overrides(toy_root, store, name, **extra):
            command += ["--set", item]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        runs = tracking.find_runs(_config(toy_root, store, name, **extra), "classify")
        assert len(runs) == 1  # rank 1 opened no run of its own
        outcomes[name] = runs[0]
    one, ddp = (load_checkpoint(outcomes[n].fetch("checkpoints/model.pt"))["state_dict"]
                for n in ("one", "ddp"))
    torch.manual_seed(0)  # the stage's seed: the weights the runs started from
    start = build_classifier(_config(toy_root, store, "one").classify, len(voc.class_names(toy_root))).state_dict()
    assert not torch.equal(one["cam_head.weight"], start["cam_head.weight"])  # it trained
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda detail, key=key: f"{key}: {detail}")
    assert outcomes["ddp"].metrics["loss/total"] == pytest.approx(outcomes["one"].metrics["loss/total"],
                                                                  rel=1e-5)
    assert tracking.client().get_run(outcomes["ddp"].run_id).data.params["world_size"] == "2"
    # system metrics: one process logs plain system/*, each rank of two logs as its own node
    logged = {n: {k.rsplit("/", 1)[0] for k in outcomes[n].metrics if k.startswith("system/")} for n in outcomes}
    assert logged == {"one": {"system"}, "ddp": {"system/rank0", "system/rank1"}}
