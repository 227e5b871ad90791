"""The stage engine: one resume model for every stage, per-item records, what every run logs
(its dataset, system metrics), and the quality rule.

A toy stage (`count`) runs over items through `job.map`, so each rule is checked on a method that
takes milliseconds: a stopped start continues in the same run with the missing items only, a
changed setting makes another run, `--resume` with a changed setting is refused in one line, and
a finished run is never reopened.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mcis_cli import engine, quality, tracking
from mcis_cli.config import Config
from mcis_cli.errors import McisError

COUNT = engine.Stage("count", sections=("localize",))
ITEMS = [f"img{i}" for i in range(7)]


class Stop(Exception):
    """Raised by the toy method to stop a start midway, as a kill would."""


def count(cfg: Config, stop_after: int | None = None, resume: str | None = None,
          seen: list[str] | None = None) -> engine.StageResult:
    """Each item's record is its length times the partner count; the run logs their sum."""
    job = engine.start(COUNT, cfg, resume=resume)
    with job.open():
        def process(todo):
            for n, item in enumerate(todo):
                if stop_after is not None and n == stop_after:
                    raise Stop
                if seen is not None:
                    seen.append(item)
                yield item, {"value": len(item) * cfg.localize.partners}

        records = job.map("count", ITEMS, process, key=lambda item: item, chunk=2)
        total = float(records.summed("value")[0])
        job.report(lambda log: log.log_metrics({"total": total, "computed": records.computed}))
    return job.result({"total": total, "computed": records.computed})


def _cfg(store: Path, name: str, **localize) -> Config:
    root = store / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    return Config.model_validate({"name": name, "device": "cpu", "output_dir": str(store / "runs"),
                                  "data": {"root": str(root)}, "localize": localize})


def _runs(cfg: Config) -> list:
    mlc = MlflowClient(tracking.tracking_uri())
    return mlc.search_runs([tracking.experiment_id(tracking.client(cfg), cfg)],
                           order_by=["attributes.start_time ASC"])


def test_a_stopped_stage_started_again_continues_its_run_with_the_missing_items(store):
    cfg = _cfg(store, "engine-continue")
    with pytest.raises(Stop):
        count(cfg, stop_after=3)  # chunks of 2: items 0-1 recorded, 2 computed but its chunk not whole
    [stopped] = _runs(cfg)
    assert stopped.info.status == "FAILED"
    seen: list[str] = []
    result = count(cfg, seen=seen)
    assert result.run_id == stopped.info.run_id
    assert seen == ITEMS[2:]  # the chunk of items 2-3 again, whole; 0-1 not
    assert result.metrics == {"total": 4.0 * len(ITEMS) * 3, "computed": 4}  # partners default 3; img2 kept
    assert [r.info.status for r in _runs(cfg)] == ["FINISHED"]

    again = count(cfg)  # a finished run is never reopened: the same command makes a new run
    assert again.run_id != result.run_id and again.metrics["computed"] == len(ITEMS)


def test_a_changed_setting_makes_another_run_and_an_explicit_resume_refuses_it(store):
    cfg = _cfg(store, "engine-changed", partners=1)
    with pytest.raises(Stop):
        count(cfg, stop_after=2)
    [stopped] = _runs(cfg)
    changed = _cfg(store, "engine-changed", partners=2)
    with pytest.raises(McisError, match=rf"^--resume {stopped.info.run_id}: localize.partners is 1 in that "
                                        "run, 2 now; resume with the run's own settings"):
        count(changed, resume=stopped.info.run_id)
    other = count(changed)
    assert other.run_id != stopped.info.run_id and other.metrics["computed"] == len(ITEMS)
    resumed = count(cfg, resume=stopped.info.run_id)
    assert resumed.run_id == stopped.info.run_id and resumed.metrics["total"] == 4.0 * len(ITEMS)


def test_resume_of_a_finished_run_or_of_another_stage_is_refused(store):
    cfg = _cfg(store, "engine-refused")
    done = count(cfg)
    with pytest.raises(McisError, match="that count run finished; start a new run instead"):
        count(cfg, resume=done.run_id)
    with engine.stage_run(cfg, "classify") as other:
        pass
    with pytest.raises(McisError, match=f"run {other.run_id} is a 'classify' run; this command needs a count run"):
        count(cfg, resume=other.run_id)


def test_records_sum_arrays_and_read_back_in_item_order(tmp_path):
    records = engine.Records(tmp_path, ["b", "a"], computed=2)
    np.savez(tmp_path / "a.npz", cm=np.array([[1, 2], [3, 4]]), n=1)
    np.savez(tmp_path / "b.npz", cm=np.array([[10, 0], [0, 10]]))
    assert [sorted(r) for r in records] == [["cm"], ["cm", "n"]]
    cm, n, missing = records.summed("cm", "n", "missing")
    np.testing.assert_array_equal(cm, [[11, 2], [3, 14]])
    assert n == 1 and missing is None
    ns, cms = records.listed("n", "cm")
    assert [int(v) for v in ns] == [1] and len(cms) == 2 and sorted(records.get("a")) == ["cm", "n"]


def test_best_threshold_passes_over_a_nan_point_and_takes_the_lowest_on_a_tie():
    assert quality.best_threshold([0.4, math.nan, 0.6, 0.6, 0.1]) == 2
    assert quality.best_threshold([math.nan, 0.3]) == 1  # np.argmax would pick the NaN
    assert quality.best_threshold([math.nan, math.nan]) == 0


def test_maps_scores_picks_the_best_sweep_point():
    names = ["background", "a"]
    # threshold 0.2 labels everything a (wrong on the background half); 0.5 gets both right
    sweep = np.array([[[0, 5], [0, 5]], [[5, 0], [0, 5]]])
    scored = quality.maps_scores(sweep, None, names, [0.2, 0.5])
    assert scored["best"] == 1 and scored["threshold"] == 0.5 and scored["hot"] == {}
    np.testing.assert_array_equal(scored["cm"], sweep[1])
    assert scored["curve"][1]["miou"] == 1.0 and scored["curve"][0]["miou"] == pytest.approx(0.25)


def test_every_run_logs_its_dataset_and_system_metrics(store):
    cfg = _cfg(store, "engine-inputs").replace(tracking={"system_metrics": 0.2})
    with engine.stage_run(cfg, "localize") as tracker:
        time.sleep(1.0)  # a few samples
    run = MlflowClient(tracking.tracking_uri()).get_run(tracker.run_id)
    [given] = run.inputs.dataset_inputs
    assert given.dataset.name == "voc" and given.dataset.digest == run.data.tags["mcis.dataset_fingerprint"]
    assert json.loads(given.dataset.source)["uri"] == str(Path(cfg.data.root).resolve())
    assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "localize"}
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system

    quiet = cfg.replace(tracking={"system_metrics": 0})
    with engine.stage_run(quiet, "localize") as tracker:
        time.sleep(0.5)
    assert not [k for k in MlflowClient(tracking.tracking_uri()).get_run(tracker.run_id).data.metrics if k.startswith("system/")]
