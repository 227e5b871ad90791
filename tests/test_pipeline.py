"""`mcis pipeline`: every stage's run, metric and artifact, a resume after a failure, the ablation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mcis_cli import pipeline, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.stages import StageResult, export
from tests import ranks

REPO = Path(__file__).resolve().parents[1]
STEPS = ["classify", "localize", "pseudolabel", "segment", "evaluate", "export",
         "classify_cam", "localize_cam", "pseudolabel_cam", "segment_gt", "evaluate_gt"]
# artifacts each step must have logged (a folder counts when it holds at least `count` files)
ARTIFACTS = {
    "classify": [("checkpoints/model.pt", 1)], "classify_cam": [("checkpoints/model.pt", 1)],
    "localize": [("maps", 48), ("maps_overlays.png", 1)], "localize_cam": [("maps", 48)],
    "pseudolabel": [("pseudo", 48), ("pseudo_overlays.png", 1)], "pseudolabel_cam": [("pseudo", 48)],
    "segment": [("checkpoints/model.pt", 1)], "segment_gt": [("checkpoints/model.pt", 1)],
    "evaluate": [("confusion.csv", 1), ("results.md", 1), ("plots", 3)], "evaluate_gt": [("confusion.csv", 1)],
    "export": [("onnx", 1), ("parity.json", 1)],
}


def tiny_config(tmp_path: Path, toy_root: Path, name: str, **sections) -> Path:
    """configs/toy.yaml at a budget of seconds: the shipped method settings, tiny schedules."""
    tree = {
        "base": str(REPO / "configs" / "toy.yaml"), "name": name, "output_dir": str(tmp_path / "runs"),
        "data": {"root": str(toy_root), "synth": None},
        "classify": {"input_size": 32, "epochs": 2, "decay_epochs": [1], "checkpoint_epoch": 1,
                     "contrastive_from_epoch": 1},
        "localize": {"partners": 1},
        "segment": {"crop": 48, "iters": 12, "val_every": 0, "checkpoint_every": 6},
        "evaluate": {"scales": [1.0], "flip": False, "jobs": 1, "overlays": 2},
        "export": {"parity_sizes": [[1, 64, 64], [2, 40, 56]]},
        "pipeline": {"ablation_seeds": [0, 1]},
    }
    for section, fields in sections.items():
        tree[section] = {**tree.get(section, {}), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _children(mlc: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = mlc.get_run(parent_id)
    runs = mlc.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags[tracking.STEP_TAG]: r for r in runs if tracking.STEP_TAG in r.data.tags}


def _artifact_count(mlc: MlflowClient, run_id: str, path: str) -> int:
    """1 for a logged file, the number of entries for a logged folder, else 0."""
    folder = str(Path(path).parent) if "/" in path else None
    entry = {a.path: a for a in mlc.list_artifacts(run_id, folder)}.get(path)
    if entry is None:
        return 0
    return len(mlc.list_artifacts(run_id, path)) if entry.is_dir else 1


def _newest_version(mlc: MlflowClient, name: str):
    return max(mlc.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _pipeline_runs(mlc: MlflowClient, name: str) -> list:
    experiment = mlc.get_experiment_by_name(name)
    return mlc.search_runs([experiment.experiment_id], f"tags.`{tracking.STAGE_TAG}` = 'pipeline'")


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_after_a_failure(tmp_path, toy_root, store, monkeypatch):
    config = tiny_config(tmp_path, toy_root, "e2e")
    real_export = export.run

    def broken_export(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export, "run", broken_export)
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config)])
    assert result.exit_code != 0
    mlc = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())  # never an earlier test's registry
    [failed] = _pipeline_runs(mlc, "e2e")
    assert failed.info.status == "FAILED"
    before = {name: run.info.run_id for name, run in _children(mlc, failed.info.run_id).items()}
    assert set(before) == {"classify", "localize", "pseudolabel", "segment", "evaluate"}

    monkeypatch.setattr(export, "run", real_export)
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "reusing finished run" in result.output
    [parent] = _pipeline_runs(mlc, "e2e")  # the same parent, resumed and now finished
    assert parent.info.run_id == failed.info.run_id and parent.info.status == "FINISHED"
    children = _children(mlc, parent.info.run_id)
    assert sorted(children) == sorted(STEPS)
    assert all(children[name].info.run_id == run_id for name, run_id in before.items())
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        for path, count in ARTIFACTS[name]:
            assert _artifact_count(mlc, run.info.run_id, path) >= count, (name, path)

    m = {name: run.data.metrics for name, run in children.items()}
    for name, key in [("localize", "maps/miou"), ("localize_cam", "maps/miou"), ("pseudolabel", "pseudo/miou"),
                      ("pseudolabel_cam", "pseudo/miou"), ("evaluate", "miou"), ("evaluate_gt", "miou"),
                      ("evaluate", "miou_nocrf"), ("pseudolabel", "pseudo/precision"),
                      ("pseudolabel", "pseudo/recall")]:
        assert 0.0 < m[name][key] <= 1.0, (name, key)
    assert m["localize"]["maps/images"] == 48 and m["pseudolabel"]["pseudo/images"] == 48
    assert 0.0 <= m["pseudolabel"]["pseudo/ignore_frac"] < 1.0
    assert 0.0 < m["classify"]["val/mAP"] <= 1.0
    lr = mlc.get_metric_history(children["classify"].info.run_id, "lr")
    assert [p.step for p in lr] == list(range(2 * 12))  # every step of 2 epochs of 48 / 4 pairs
    assert m["export"]["parity/max_abs_diff"] < 1e-3 and not any(k.startswith("speed/") for k in m["export"])
    assert children["segment_gt"].data.tags["mcis.labels"] == "gt"
    assert children["segment"].data.tags[tracking.SOURCE_TAG] == children["pseudolabel"].info.run_id
    assert children["localize_cam"].data.params["localize.method"] == "cam"

    summary = parent.data.metrics
    assert summary["seg/miou"] == pytest.approx(m["evaluate"]["miou"])
    assert summary["cam/maps_miou"] == pytest.approx(m["localize_cam"]["maps/miou"])
    assert summary["ceiling/fraction"] == pytest.approx(m["evaluate"]["miou"] / m["evaluate_gt"]["miou"])
    results = Path(mlc.download_artifacts(parent.info.run_id, "results.md", str(tmp_path)))
    assert all(key in results.read_text() for _, key, _ in pipeline.result_rows({}))
    assert all(run.info.run_name == name for name, run in children.items())  # segment vs segment_gt

    # after the pipeline, the commands' defaults follow the method, never a baseline or the ceiling
    exported = CliRunner().invoke(app, ["export", "--config", str(config)])
    assert exported.exit_code == 0, exported.output
    assert f"step segment of pipeline run {parent.info.run_id}" in exported.output
    version = _newest_version(mlc, "mcis-deeplab-toy")  # toy.yaml's name, never the VOC model's
    assert not mlc.search_registered_models("name='mcis-deeplab'")
    assert version.tags[tracking.SOURCE_TAG] == children["segment"].info.run_id
    assert (version.tags[tracking.ROLE_TAG], version.tags[tracking.LABELS_TAG]) == ("method", "pseudo")
    assert tracking.registry.aliases(mlc.get_registered_model("mcis-deeplab-toy"))["challenger"] == str(version.version)
    ceiling = ["export", "--config", str(config), "--from-run", children["segment_gt"].info.run_id]
    refused = CliRunner().invoke(app, ceiling)
    assert refused.exit_code == 2 and "fully supervised ceiling" in refused.stderr
    assert _newest_version(mlc, "mcis-deeplab-toy").version == version.version
    on_purpose = CliRunner().invoke(app, [*ceiling, "--ceiling"])
    assert on_purpose.exit_code == 0, on_purpose.output
    ceiling_version = _newest_version(mlc, "mcis-deeplab-toy")
    tags = ceiling_version.tags
    assert (tags[tracking.ROLE_TAG], tags[tracking.LABELS_TAG]) == ("ceiling", "gt")
    refused = CliRunner().invoke(app, ["promote", str(ceiling_version.version), "--name", "mcis-deeplab-toy"])
    assert refused.exit_code == 2 and "is a ceiling model" in refused.stderr
    promoted = CliRunner().invoke(app, ["promote", "challenger", "--name", "mcis-deeplab-toy"])
    assert promoted.exit_code == 0 and f"-> version {version.version}" in promoted.stdout, promoted.output
    localized = CliRunner().invoke(app, ["localize", "--config", str(config)])
    assert localized.exit_code == 0, localized.output
    newest = tracking.find_runs(load_config(config), "localize")[0]
    assert newest.tags[tracking.SOURCE_TAG] == children["classify"].info.run_id
    assert newest.tags[tracking.ROLE_TAG] == "method"

    # everything written is readable by others under the usual 022 umask (set by the store fixture)
    written = [p for folder in (tmp_path / "runs", Path("mlruns")) for p in folder.rglob("*") if p.is_file()]
    assert len(written) > 100
    assert [p for p in written if p.stat().st_mode & 0o044 != 0o044] == []


@pytest.mark.slow
def test_ablation_trains_each_variant_per_seed_and_logs_the_spread(tmp_path, toy_root, store):
    config = tiny_config(tmp_path, toy_root, "e2e-ablation", pipeline={"baselines": False})
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), "--ablation"])
    assert result.exit_code == 0, result.output
    mlc = MlflowClient(tracking.tracking_uri())
    [parent] = _pipeline_runs(mlc, "e2e-ablation")
    children = _children(mlc, parent.info.run_id)
    variants = [v.key for v in pipeline.ablation_variants(load_config(config))]
    for key in variants:
        for seed in (0, 1):
            for stage in ("localize", "pseudolabel"):
                run = children[f"ablation/{key}/seed{seed}/{stage}"]
                assert run.data.tags[pipeline.ABLATION_TAG] == key and run.data.params["seed"] == str(seed)
        assert 0 <= parent.data.metrics[f"ablation/{key}/maps_miou_std"] < 1
    # one classifier per (classify section, seed); the method's own at seed 0 is the pipeline's
    trained = sorted(k for k in children if k.endswith("/classify"))
    assert trained == ["ablation/cam/seed0/classify", "ablation/cam/seed1/classify",
                       "ablation/coatt/seed0/classify", "ablation/coatt/seed1/classify",
                       "ablation/contrast/seed0/classify", "ablation/contrast/seed1/classify",
                       "ablation/mcis_p1/seed1/classify"]
    partners = {children[f"ablation/mcis_p{k}/seed1/localize"].data.tags[tracking.SOURCE_TAG] for k in (1, 3, 5)}
    assert partners == {children["ablation/mcis_p1/seed1/classify"].info.run_id}
    text = Path(mlc.download_artifacts(parent.info.run_id, "ablation.md", str(tmp_path))).read_text()
    assert "plain CAM" in text and "5 partners" in text
    assert _artifact_count(mlc, parent.info.run_id, "ablation.png") == 1


@pytest.mark.slow
def test_seeds_runs_one_pipeline_per_data_seed_and_logs_mean_and_std(tmp_path, toy_root, store, monkeypatch):
    data = {"root": str(tmp_path / "data"), "synth": {"seed": 0, "n_train": 24, "n_val": 8, "size": 64}}
    config = tiny_config(tmp_path, toy_root, "e2e-seeds", data=data, pipeline={"baselines": False})
    real_export = export.run

    def export_fails_on_seed_4(cfg, **kwargs):
        if cfg.data.synth.seed == 4:
            raise OSError("disk full (injected)")
        return real_export(cfg, **kwargs)

    monkeypatch.setattr(export, "run", export_fails_on_seed_4)
    assert CliRunner().invoke(app, ["pipeline", "--config", str(config), "--seeds", "3,4"]).exit_code != 0
    monkeypatch.setattr(export, "run", real_export)
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), "--seeds", "3,4"])
    assert result.exit_code == 0, result.output
    assert "data seed 3: reusing finished pipeline" in result.output  # the failed attempt's
    assert "classify: reusing finished run" in result.output.split("data seed 4")[1]  # 4 resumes at export

    mlc = MlflowClient(tracking.tracking_uri())
    experiment = mlc.get_experiment_by_name("e2e-seeds").experiment_id
    [parent] = mlc.search_runs([experiment], f"tags.`{tracking.STAGE_TAG}` = 'seeds'")  # reopened, not new
    assert parent.info.status == "FINISHED" and parent.data.tags["mcis.data_seeds"] == "3,4"
    children = _children(mlc, parent.info.run_id)
    assert sorted(children) == ["seed3", "seed4"]
    for seed, run in zip((3, 4), (children["seed3"], children["seed4"]), strict=True):
        assert run.data.tags[pipeline.DATA_SEED_TAG] == str(seed) and run.info.status == "FINISHED"
        assert run.data.params["data.root"] == str(tmp_path / f"data-seed{seed}")
        assert (tmp_path / f"data-seed{seed}" / "JPEGImages").is_dir()
    columns = [children["seed3"].data.metrics, children["seed4"].data.metrics]
    assert columns[0]["seg/miou"] != columns[1]["seg/miou"]  # other images, other scores
    summary = parent.data.metrics
    for key in ("mcis/maps_miou", "mcis/pseudo_miou", "seg/miou", "ceiling/fraction", "export/max_abs_diff"):
        if key == "ceiling/fraction":  # baselines off: no ceiling, no mean
            assert f"{key}_mean" not in summary
            continue
        values = [column[key] for column in columns]
        assert summary[f"{key}_mean"] == pytest.approx(np.mean(values))
        assert summary[f"{key}_std"] == pytest.approx(np.std(values))
    text = Path(mlc.download_artifacts(parent.info.run_id, "seeds.md", str(tmp_path))).read_text()
    assert "| seed 3 | seed 4 | mean | std |" in text
    assert f"| {summary['seg/miou_mean']:.4f} | {summary['seg/miou_std']:.4f} |" in text


@pytest.mark.parametrize(("options", "message"), [
    (["--seeds", "1,2"], "--seeds needs the embedded dataset (a data.synth section)"),
    (["--seeds", "1,x"], "expected comma-separated integers"),
    (["--seeds", "1,1"], "names a seed twice"),
    (["--seeds", "1,2", "--ablation"], "--ablation and --seeds together"),
])
def test_seeds_refuses_bad_input_in_one_line(tmp_path, toy_root, store, options, message):
    config = tiny_config(tmp_path, toy_root, "seeds-refused")  # data.synth: None, i.e. real data
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), *options])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert tracking.find_runs(load_config(config), "seeds", finished=False) == []


def test_settings_2_and_3_report_their_gain_over_setting_1():
    results = {"evaluate": StageResult("a", {"miou": 0.52}), "evaluate_gt": StageResult("b", {"miou": 0.65})}
    rows = {key: value for _, key, value in pipeline.result_rows(results, {"seg/miou": 0.5}, "toy")}
    assert rows["gain/seg_miou"] == pytest.approx(0.02) and rows["setting1/seg_miou"] == 0.5
    assert rows["ceiling/fraction"] == pytest.approx(0.8) and rows["cam/maps_miou"] is None
    missing = {key: value for _, key, value in pipeline.result_rows(results, {}, "toy")}
    assert missing["gain/seg_miou"] is None  # no finished setting-1 pipeline yet
    assert "gain/seg_miou" not in {key for _, key, _ in pipeline.result_rows(results)}


@pytest.mark.parametrize("name", ["toy_extra", "toy_web"])
def test_setting_configs_add_their_list_and_keep_the_budget_per_image(name):
    base, cfg = load_config(REPO / "configs" / "toy.yaml"), load_config(REPO / "configs" / f"{name}.yaml")
    extra = cfg.data.synth.n_extra + cfg.data.synth.n_web
    assert cfg.data.extra_lists == [name.removeprefix("toy_")] and extra > 0
    assert cfg.data.root != base.data.root  # its own tree, with the extra images
    assert cfg.pipeline.compare_to == base.name
    ratio = (base.data.synth.n_train + extra) / base.data.synth.n_train
    assert cfg.segment.iters == round(base.segment.iters * ratio)
    assert cfg.classify.epochs == base.classify.epochs
    same = {k: v for k, v in cfg.flat().items() if not k.startswith(("data.", "segment.iters", "name", "pipeline."))}
    assert same == {k: v for k, v in base.flat().items() if k in same}


@pytest.mark.slow
def test_pipeline_under_torchrun_nests_every_step_under_rank_0s_parent(tmp_path, toy_root, store):
    config = tiny_config(tmp_path, toy_root, "e2e-ranks", pipeline={"baselines": False})
    done = ranks.torchrun(["pipeline", "--config", str(config)])
    assert done.returncode == 0, done.stderr[-3000:]
    mlc = MlflowClient(tracking.tracking_uri())
    [parent] = _pipeline_runs(mlc, "e2e-ranks")  # rank 1 opened no parent of its own
    assert parent.info.status == "FINISHED"
    children = _children(mlc, parent.info.run_id)
    assert sorted(children) == sorted(STEPS[:6])
    experiment = mlc.get_experiment_by_name("e2e-ranks").experiment_id
    assert len(mlc.search_runs([experiment])) == 7  # nor any step's run
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert children["classify"].data.params["world_size"] == "2"
    assert done.stdout.count("pipeline finished") == 1  # rank 0 reports
