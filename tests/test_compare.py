"""`mcis pipeline --methods`: several methods' chains on the same data, one table, paired seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from mcis_cli import methods, pipeline, tracking
from mcis_cli.cli import app
from mcis_cli.config import PseudolabelCfg, load_config
from mcis_cli.errors import McisError
from tests.test_pipeline import _artifact_count, _children, tiny_config


def test_method_names_are_checked_and_made_metric_safe():
    assert methods.parse("cam, mcis") == ["cam", "mcis"]
    with pytest.raises(McisError, match=r"unknown method 'nope' in --methods; choose from cam, oaa, oaa\+, psa, mcis, mcis\+rw"):
        methods.parse("cam,nope")
    with pytest.raises(McisError, match="names a method twice"):
        methods.parse("mcis,mcis")
    assert [methods.metric_prefix(n) for n in ("cam", "oaa+", "mcis+rw")] == ["cam", "oaa_plus", "mcis_plus_rw"]


def test_each_method_gets_its_own_pseudo_mask_thresholds():
    p = PseudolabelCfg()  # MCIS's: conflict 0.99, att_thr 0.95
    for method in ("oaa", "oaa+"):  # OAA's gen_gt.py: conflict 0.9, att_thr 0.8, the rest as MCIS
        own = p.for_method(method)
        assert (own.conflict, own.att_thr, own.fg_thr, own.bg_thr) == (0.9, 0.8, 0.3, 32)
    for method in ("mcis", "cam", None):
        assert p.for_method(method) == p


def test_paired_differences_count_the_seeds_each_way():
    names = ["cam", "oaa+"]
    columns = {100: {"cam/seg/miou": 0.50, "oaa_plus/seg/miou": 0.40},
               101: {"cam/seg/miou": 0.30, "oaa_plus/seg/miou": 0.45},
               102: {"cam/seg/miou": 0.60, "oaa_plus/seg/miou": 0.35}}
    [row] = [r for r in pipeline.paired_rows(names, columns) if r.measure == "seg/miou"]
    assert row.key == "cam-oaa_plus/seg/miou"
    assert row.diffs == pytest.approx([0.10, -0.15, 0.25])
    assert row.mean == pytest.approx(0.20 / 3) and row.wins == (2, 1)
    [maps] = [r for r in pipeline.paired_rows(names, columns) if r.measure == "maps_miou"]
    assert maps.diffs == [None] * 3 and maps.mean is None and maps.wins == (0, 0)  # never measured


@pytest.mark.parametrize(("options", "message"), [
    (["--methods", "cam,nope"], "unknown method 'nope' in --methods"),
    (["--methods", "cam", "--ablation"], "--ablation and --methods together"),
])
def test_bad_methods_are_refused_in_one_line(tmp_path, toy_root, store, options, message):
    config = tiny_config(tmp_path, toy_root, "compare-refused")
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), *options])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert tracking.find_runs(load_config(config), "pipeline", finished=False) == []


@pytest.mark.slow
def test_methods_run_on_the_same_seeds_with_one_table_a_figure_and_paired_differences(tmp_path, toy_root, store):
    data = {"root": str(tmp_path / "data"), "synth": {"seed": 0, "n_train": 24, "n_val": 8, "size": 64}}
    config = tiny_config(tmp_path, toy_root, "compare", data=data)
    result = CliRunner().invoke(app, ["pipeline", "--config", str(config), "--methods", "cam,mcis",
                                      "--seeds", "3,4"])
    assert result.exit_code == 0, result.output
    assert "Paired differences over 2 data seeds" in result.output

    mlc = MlflowClient(tracking.tracking_uri())
    experiment = mlc.get_experiment_by_name("compare").experiment_id
    [parent] = mlc.search_runs([experiment], f"tags.`{tracking.STAGE_TAG}` = 'seeds'")
    seeds = _children(mlc, parent.info.run_id)
    columns = {}
    for name, run in seeds.items():
        assert run.data.tags["mcis.methods"] == "cam,mcis"
        steps = _children(mlc, run.info.run_id)
        assert set(steps) == {f"{m}/{s}" for m in ("cam", "mcis")
                              for s in ("classify", "localize", "pseudolabel", "segment", "evaluate")} | {
                                  "segment_gt", "evaluate_gt"}
        for step, child in steps.items():  # the method of every run of a chain, for the compare view
            assert child.data.tags.get(tracking.METHOD_TAG) == (None if step.endswith("_gt") else step.split("/")[0])
        assert steps["cam/classify"].data.tags[tracking.ROLE_TAG] == tracking.BASELINE
        metrics = run.data.metrics
        for m in ("cam", "mcis"):
            assert metrics[f"{m}/seg/miou"] == steps[f"{m}/evaluate"].data.metrics["miou"]
            assert metrics[f"{m}/pseudo_miou"] == steps[f"{m}/pseudolabel"].data.metrics["pseudo/miou"]
            assert metrics[f"{m}/ceiling_fraction"] == pytest.approx(metrics[f"{m}/seg/miou"] / metrics["ceiling/miou"])
        assert _artifact_count(mlc, run.info.run_id, "comparison.png") == 1
        columns[name] = metrics
    diffs = [c["cam/pseudo_miou"] - c["mcis/pseudo_miou"] for c in columns.values()]
    assert parent.data.metrics["paired/cam-mcis/pseudo_miou_mean_diff"] == pytest.approx(np.mean(diffs))
    text = Path(mlc.download_artifacts(parent.info.run_id, "paired.md", str(tmp_path))).read_text()
    assert "| pseudo_miou | cam - mcis |" in text
