"""PSA's stages on the embedded data: the chain psa_classify -> psa_cam -> affinity -> refine ->
pseudolabel, the refusals of refine, the models and the optimizer switch, the maps format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mcis_cli import artifacts, engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.data import synth, transforms, voc
from mcis_cli.models.psa import AffinityNet, PSAClassifier, optimizer, param_groups
from mcis_cli.stages import affinity, psa_cam, psa_classify, pseudolabel, refine
from mcis_cli.stages.pseudolabel import walk_labels
from tests import ranks
from tests.test_localize import _all_maps

REPO = Path(__file__).resolve().parents[1]


def psa_config(tmp_path: Path, root: Path, name: str, **sections) -> Path:
    """configs/toy.yaml with PSA at a budget of seconds."""
    tree = {"base": str(REPO / "configs" / "toy.yaml"), "name": name, "output_dir": str(tmp_path / "runs"),
            "data": {"root": str(root), "synth": None},
            "psa": {"epochs": 2, "batch_size": 8, "cam_scales": [1.0, 0.5]},
            "affinity": {"epochs": 1, "batch_size": 8}}
    for section, fields in sections.items():
        tree[section] = {**tree.get(section, {}), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory, toy_root, store):
    """One run of every PSA stage and the pseudo masks of the walk."""
    tmp = tmp_path_factory.mktemp("psa")
    cfg = load_config(psa_config(tmp, toy_root, "psa"))
    trained = psa_classify.run(cfg)
    cams = psa_cam.run(cfg, from_run=trained.run_id)
    aff = affinity.run(cfg, from_run=cams.run_id)
    walked = refine.run(cfg, from_run=cams.run_id, affinity_run=aff.run_id)
    masks = pseudolabel.run(cfg, from_run=walked.run_id)
    return {"tmp": tmp, "cfg": cfg, "psa_classify": trained, "psa_cam": cams, "affinity": aff,
            "refine": walked, "pseudolabel": masks}


def test_every_psa_run_is_tagged_psa_and_finished(chain):
    mlc = MlflowClient(tracking.tracking_uri())
    for stage in ("psa_classify", "psa_cam", "affinity", "refine", "pseudolabel"):
        run = mlc.get_run(chain[stage].run_id)
        assert run.info.status == "FINISHED", stage
        assert run.data.tags[tracking.METHOD_TAG] == "psa", stage
        assert run.data.tags[tracking.STAGE_TAG] == stage
    assert "lr" in mlc.get_run(chain["affinity"].run_id).data.metrics
    assert mlc.get_metric_history(chain["affinity"].run_id, "loss/neg")


def test_walked_maps_keep_their_classes_and_gain_a_background(chain, toy_root):
    cam_dir, rw_dir = (Path(chain[s].outputs[artifacts.MAPS]) for s in ("psa_cam", "refine"))
    samples = voc.train_samples(chain["cfg"].data)
    assert len(list(rw_dir.glob("*.npz"))) == len(samples)
    for sample in samples[:6]:
        cams, classes = artifacts.load_maps(artifacts.map_file(cam_dir, sample.id))
        walked, walked_classes = artifacts.load_maps(artifacts.map_file(rw_dir, sample.id))
        bg = artifacts.load_background(artifacts.map_file(rw_dir, sample.id))
        assert artifacts.load_background(artifacts.map_file(cam_dir, sample.id)) is None
        assert list(classes) == list(walked_classes) == list(sample.labels)
        assert walked.shape == cams.shape and bg.shape == cams.shape[1:]
        assert 0 <= walked.min() and walked.max() <= 1 and 0 <= bg.min() and bg.max() <= 1
        # the walk's pseudo mask: argmax over the stored planes, background first
        mask = transforms.read_index_png(artifacts.mask_file(Path(chain["pseudolabel"].outputs[artifacts.PSEUDO]),
                                                              sample.id))
        ids = np.array([0, *(c + 1 for c in classes)])
        expected = ids[np.concatenate([bg[None], walked]).astype(np.float32).argmax(0)]
        assert np.array_equal(mask, expected)


def test_the_affinity_run_keeps_confident_labels_of_every_image(chain):
    records = Path(chain["tmp"]) / "runs" / chain["affinity"].run_id / engine.RECORDS / affinity.LABELS
    files = sorted(records.glob("*.npz"))
    assert len(files) == len(voc.train_samples(chain["cfg"].data))
    with np.load(files[0]) as record:
        low, high = record["low"].astype(np.float32) / 255, record["high"].astype(np.float32) / 255
    assert low.shape == high.shape and low.shape[0] >= 2
    assert np.allclose(low.sum(0), 1, atol=0.02)  # CRF marginals, 1/255 steps
    # a high alpha shrinks the background score, so the CRF leaves less background than at the low
    assert (high.argmax(0) == 0).mean() <= (low.argmax(0) == 0).mean()


def _maps(cfg, stage: str, run_id: str) -> dict[str, np.ndarray]:
    return _all_maps(tracking.resolve_run(cfg, stage, run_id))


def _confident(chain, run_id: str) -> dict[str, dict[str, np.ndarray]]:
    folder = Path(chain["tmp"]) / "runs" / run_id / engine.RECORDS / affinity.LABELS
    return {p.stem: dict(np.load(p)) for p in sorted(folder.glob("*.npz"))}


@pytest.mark.slow
def test_two_ranks_give_the_cams_confident_labels_and_walks_of_one_process(chain):
    """psa cam, affinity's confident labels and refine share their images out under torchrun;
    what each image gets must not depend on which rank computed it."""
    cfg = chain["cfg"]

    def two_ranks(stage: str, *args: str) -> str:
        done = ranks.torchrun([*args, "--config", str(Path(chain["tmp"]) / "psa.yaml")])
        assert done.returncode == 0, done.stderr[-3000:]
        return tracking.find_runs(cfg, stage)[0].run_id

    cams = two_ranks("psa_cam", "psa", "cam", "--from-run", chain["psa_classify"].run_id)
    expected = _maps(cfg, "psa_cam", chain["psa_cam"].run_id)
    got = _maps(cfg, "psa_cam", cams)
    assert got.keys() == expected.keys() and len(got) == len(voc.train_samples(cfg.data))
    assert all(np.abs(got[i].astype(np.float32) - expected[i]).max() <= 1e-6 for i in got)

    aff = two_ranks("affinity", "affinity", "--from-run", chain["psa_cam"].run_id)
    got, expected = _confident(chain, aff), _confident(chain, chain["affinity"].run_id)
    assert got.keys() == expected.keys() and len(got) == len(voc.train_samples(cfg.data))
    assert all(np.array_equal(got[i][k], expected[i][k]) for i in got for k in ("low", "high"))

    walked = two_ranks("refine", "refine", "--from-run", chain["psa_cam"].run_id, "--affinity-run", chain["affinity"].run_id)
    expected = _maps(cfg, "refine", chain["refine"].run_id)
    got = _maps(cfg, "refine", walked)
    assert got.keys() == expected.keys()
    assert all(np.abs(got[i].astype(np.float32) - expected[i]).max() <= 1e-6 for i in got)


def test_refine_resumes_nothing_twice_and_reuses_the_finished_run_for_the_same_key(chain):
    again = refine.run(chain["cfg"], from_run=chain["psa_cam"].run_id, affinity_run=chain["affinity"].run_id)
    assert again.run_id != chain["refine"].run_id  # a FINISHED run is never reopened
    assert again.metrics == chain["refine"].metrics


def _other_root(tmp_path: Path) -> Path:
    root = tmp_path / "other"
    synth.write(root, seed=1, n_train=8, n_val=4, size=64)
    return root


def _refine_runs(cfg) -> int:
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment_by_name(cfg.name)
    return len(MlflowClient(tracking.tracking_uri()).search_runs(
        [experiment.experiment_id], f"tags.`{tracking.STAGE_TAG}` = 'refine'"))


@pytest.mark.parametrize("problem", ["dataset", "images", "radius"])
def test_refine_refuses_mismatched_inputs_in_one_line(chain, tmp_path, problem):
    cfg = chain["cfg"]
    config = psa_config(chain["tmp"], Path(cfg.data.root), "psa")
    maps_run = chain["psa_cam"].run_id
    options = []
    if problem == "dataset":
        config = psa_config(chain["tmp"], _other_root(tmp_path), "psa")
        expected = f"affinity run {chain['affinity'].run_id} was trained on another dataset"
    elif problem == "images":
        other = load_config(psa_config(tmp_path, _other_root(tmp_path), "psa"))
        with engine.stage_run(other, "psa_cam", tags={tracking.METHOD_TAG: "psa"}) as log:
            maps_run = log.run_id
        expected = f"maps run {maps_run} holds other images than affinity run"
    else:
        options = ["--set", "refine.radius=2"]
        expected = "refine.radius 2: affinity run"
    before = _refine_runs(cfg)
    result = CliRunner().invoke(app, ["refine", "--config", str(config), "--from-run", maps_run,
                                      "--affinity-run", chain["affinity"].run_id, *options])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and expected in result.output.replace("\n", " "), result.output
    assert "Traceback" not in result.output
    assert _refine_runs(cfg) == before


def test_psa_models_at_full_width_match_the_official_shapes():
    net = AffinityNet(radius=5)
    assert [tap[0].out_channels for tap in net.taps.values()] == [64, 128, 256]
    assert [tap[1].num_groups for tap in net.taps.values()] == [8, 16, 32]
    assert net.f9.in_channels == net.f9.out_channels == 448 and net.f9.bias is None
    assert net.backbone.fc6.dilation == (4, 4)
    x = torch.zeros(1, 3, 80, 72)
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 34, (10 - 4) * (9 - 8))
        cls = PSAClassifier(20).eval()
        assert cls.backbone.fc6.dilation == (1, 1) and cls.fc8.bias is None
        cam = cls.cam(x)
    assert cam.shape == (1, 20, 10, 9) and cam.min() >= 0
    cls.train()
    frozen = [p for p in cls.parameters() if not p.requires_grad]
    assert len(frozen) == 8  # conv1_1 .. conv2_2, weights and biases


def test_param_groups_and_the_momentum_bug_switch():
    model = PSAClassifier(3, width=0.125, batch_norm=False, blocks=4, frozen=False)
    groups = param_groups(model, 5e-4)
    assert [g["lr_mult"] for g in groups] == [1, 2, 10]  # fc8 has no bias: no 20x group
    assert [g["weight_decay"] for g in groups] == [5e-4, 0, 5e-4]
    assert groups[2]["params"] == [model.fc8.weight]
    assert optimizer(groups, 0.1, 5e-4, momentum_bug=True).param_groups[0]["momentum"] == 5e-4
    assert optimizer(param_groups(model, 5e-4), 0.1, 5e-4, momentum_bug=False).param_groups[0]["momentum"] == 0.9


def test_maps_without_a_background_load_as_before(tmp_path):
    path = tmp_path / "a.npz"
    np.savez_compressed(path, maps=np.ones((1, 2, 2), np.float16), classes=np.array([3]))  # an old file
    maps, classes = artifacts.load_maps(path)
    assert maps.shape == (1, 2, 2) and classes.tolist() == [3]
    assert artifacts.load_background(path) is None


def test_walk_rule_and_which_methods_use_it():
    maps = np.array([[[0.2, 0.6]], [[0.5, 0.1]]], np.float32)
    bg = np.array([[0.4, 0.7]], np.float32)
    assert walk_labels(maps, [4, 9], bg).tolist() == [[10, 0]]
    p = load_config(REPO / "configs" / "toy.yaml").pseudolabel
    assert p.for_method("psa").background == "walk"
    assert p.for_method("mcis+rw").background == "walk"
    assert p.for_method("mcis").background == "saliency"


def test_pipeline_compares_cam_psa_mcis_and_mcis_walked(tmp_path, toy_root, store):
    from tests.test_pipeline import tiny_config

    config = tiny_config(tmp_path, toy_root, "compare_psa", psa={"epochs": 2, "batch_size": 8, "cam_scales": [1.0]},
                         affinity={"epochs": 1, "batch_size": 8})
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), "--methods", "cam,psa,mcis,mcis+rw"])
    assert result.exit_code == 0, result.output
    mlc = MlflowClient(tracking.tracking_uri())
    experiment = mlc.get_experiment_by_name("compare_psa")
    [parent] = [r for r in mlc.search_runs([experiment.experiment_id], "tags.`mcis.stage` = 'pipeline'")]
    children = mlc.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    steps = {r.data.tags[tracking.STEP_TAG]: r for r in children}
    for name in ("psa/psa_classify", "psa/psa_cam", "psa/affinity", "psa/refine", "psa/pseudolabel", "psa/evaluate"):
        assert steps[name].data.tags[tracking.METHOD_TAG] == "psa", name
    for name in ("mcis+rw/refine", "mcis+rw/pseudolabel", "mcis+rw/evaluate"):
        assert steps[name].data.tags[tracking.METHOD_TAG] == "mcis+rw", name
    assert steps["mcis+rw/refine"].data.tags[tracking.SOURCE_TAG] == steps["mcis/localize"].info.run_id
    assert steps["mcis+rw/refine"].data.tags["mcis.affinity_run"] == steps["psa/affinity"].info.run_id
    assert steps["mcis+rw/pseudolabel"].data.params["rule.background"] == "walk"
    assert steps["mcis/pseudolabel"].data.params["rule.background"] == "saliency"
    untagged = [name for name, r in steps.items() if not r.data.tags.get(tracking.METHOD_TAG)]
    assert sorted(untagged) == ["evaluate_gt", "segment_gt"]  # the supervised ceiling is no method
    metrics = parent.data.metrics
    for prefix in ("cam", "psa", "mcis", "mcis_plus_rw"):
        assert f"{prefix}/pseudo_miou" in metrics and f"{prefix}/seg/miou" in metrics, prefix


def test_the_sparse_walk_writes_the_maps_of_the_dense_one(chain):
    cfg = chain["cfg"].replace(refine={"walk": "sparse"})
    walked = refine.run(cfg, from_run=chain["psa_cam"].run_id, affinity_run=chain["affinity"].run_id)
    dense_dir, sparse_dir = (Path(r.outputs[artifacts.MAPS]) for r in (chain["refine"], walked))
    for sample in voc.train_samples(cfg.data)[:8]:
        a, b = (artifacts.load_maps(artifacts.map_file(d, sample.id))[0].astype(np.float32) for d in (dense_dir, sparse_dir))
        bg_a, bg_b = (artifacts.load_background(artifacts.map_file(d, sample.id)).astype(np.float32)
                      for d in (dense_dir, sparse_dir))
        assert np.allclose(a, b, atol=2e-3) and np.allclose(bg_a, bg_b, atol=2e-3)  # float16 files


def test_a_psa_command_without_an_input_run_names_the_command_to_run_first(tmp_path, toy_root, store):
    config = psa_config(tmp_path, toy_root, "psa_empty")
    with engine.stage_run(load_config(psa_config(tmp_path, toy_root, "psa_store")), "segment"):
        pass  # a store with a run in another experiment
    result = CliRunner().invoke(app, ["psa", "cam", "--config", str(config)])
    assert result.exit_code == 2
    assert "run `mcis psa classify` first" in result.output.replace("\n", " ")


def test_psa_classify_killed_in_its_second_epoch_resumes_to_the_same_weights(tmp_path, toy_root, store, monkeypatch):
    cfg = load_config(psa_config(tmp_path, toy_root, "psa_resume"), ["deterministic=true"])
    full = psa_classify.run(cfg)
    forward = psa_classify.Criterion.forward
    calls = []

    def die_in_second_epoch(self, images, labels):
        calls.append(1)
        if len(calls) == 8:  # 48 images in batches of 8: step 8 is in epoch 1
            raise KeyboardInterrupt
        return forward(self, images, labels)

    monkeypatch.setattr(psa_classify.Criterion, "forward", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        psa_classify.run(cfg)
    monkeypatch.setattr(psa_classify.Criterion, "forward", forward)
    mlc = MlflowClient(tracking.tracking_uri())
    [killed] = mlc.search_runs([mlc.get_experiment_by_name("psa_resume").experiment_id], "attributes.status = 'KILLED'")
    resumed = psa_classify.run(cfg)  # the same key: the KILLED run continues from its epoch-0 state
    assert resumed.run_id == killed.info.run_id and resumed.metrics["steps"] == 12
    a, b = (torch.load(Path(r.outputs["checkpoint"]), weights_only=False)["state_dict"] for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert MlflowClient(tracking.tracking_uri()).get_run(resumed.run_id).info.status == "FINISHED"
