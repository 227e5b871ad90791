"""kill -9 during `classify` and `segment`, at a step drawn from a seeded RNG, then a restart.

Each test runs three real `mcis` processes on one sqlite store: the victim (killed with SIGKILL
once the store shows the chosen step); the restart (the same command, or `--resume RUN_ID`), which
marks the dead run KILLED, reopens it and finishes it; and an uninterrupted reference run, whose
weights the resumed run's must equal bit for bit (deterministic mode, CPU, one thread).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mcis_cli import tracking
from mcis_cli.checkpoints import load_checkpoint
from tests.reliability import procs

pytestmark = pytest.mark.slow  # real processes, two to five per test: 20-60 s each


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the module, created (migrated) once by this process."""
    return procs.new_store(tmp_path_factory.mktemp("kill-store"))


def _runs(uri: str, experiment: str) -> list:
    mlc = MlflowClient(uri)
    found = mlc.get_experiment_by_name(experiment)
    return mlc.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) if found else []


def _logged_step(uri: str, experiment: str, metric: str, step: int) -> str | None:
    """The victim's run id once its `metric` history reaches `step`."""
    runs = _runs(uri, experiment)
    if not runs:
        return None
    history = MlflowClient(uri).get_metric_history(runs[0].info.run_id, metric)
    return runs[0].info.run_id if any(m.step >= step for m in history) else None


def kill_resume_compare(tmp: Path, uri: str, stage: str, config: Path, extra: list[str],
                        metric: str, window: tuple[int, int], total: int, weights, how: str) -> dict:
    """Kill `stage` at a random step of `window`, start it again (`how`: the same command, or
    `--resume RUN_ID`), which must continue the victim's run; then a reference run (the victim's
    run has finished, so the same command makes a new one) must end with the same weights."""
    experiment = tmp.name
    environ = procs.env(uri)
    step = procs.kill_point(f"{stage}:{experiment}", *window)
    log = tmp / "victim.log"
    victim = procs.start([stage, "--config", config, *extra], tmp, environ, log)
    run_id = procs.wait_until(lambda: _logged_step(uri, experiment, metric, step), victim, log,
                              f"step {step} of {stage}", freeze=True)
    assert victim.poll() is None, "the victim finished before the kill"
    procs.kill(victim)
    had_checkpoint = (tmp / "runs" / run_id / "checkpoints" / "last.pt").is_file()
    mlc = MlflowClient(uri)
    assert mlc.get_run(run_id).info.status == "RUNNING"  # nobody could close it: the process is gone

    again = [stage, "--config", config, *extra] if how == "again" else [stage, "--config", config, "--resume", run_id]
    resumed = procs.run(again, tmp, environ)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"run {run_id} was left RUNNING" in resumed.output  # closed as KILLED, then reopened
    assert "ended without closing the run" in mlc.get_run(run_id).data.tags[tracking.END_TAG]
    assert [r.info.run_id for r in _runs(uri, experiment)] == [run_id]  # no new run
    after = mlc.get_run(run_id)
    assert after.info.status == "FINISHED"
    assert sorted({m.step for m in mlc.get_metric_history(run_id, metric)}) == list(range(total))

    reference = procs.run([stage, "--config", config, *extra], tmp, environ)
    assert reference.returncode == 0, reference.output[-3000:]
    ref_id = next(r.info.run_id for r in _runs(uri, experiment) if r.info.run_id != run_id)
    a, b = weights(tmp / "runs" / ref_id), weights(tmp / "runs" / run_id)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {step}: resumed weights differ in {different[:3]}"
    assert not list((tmp / "runs" / run_id).rglob(".*.part*")), "temporary files left behind"
    procs.record(stage, f"after step {step} of {total} was logged", from_checkpoint=had_checkpoint,
                 resumed=how, weights_equal=True, lost="nothing")
    return {"step": step, "run_id": run_id}


def _config(tmp_path, toy_root, stage: str, workers: int, **options):
    """A deterministic CPU config for one training stage, flushing metrics at every step."""
    return procs.write_config(
        tmp_path / f"{stage}.yaml", name=tmp_path.name, seed=0, deterministic=True, device="cpu",
        output_dir="runs", **{"data.root": str(toy_root), "data.workers": workers,
                              "tracking.flush_every": 1,
                              **{f"{stage}.{key}": value for key, value in options.items()}})


# a kill before the first checkpoint (resume starts over) and one after it (resume continues);
# the first is started again by the same command, the second by --resume RUN_ID
# (the last steps are left out, so the victim is still training when the step shows)
CLASSIFY_WINDOWS = {"first-epoch": (0, 1), "later": (3, 5)}  # checkpoints after steps 2, 5, 8
SEGMENT_WINDOWS = {"before-checkpoint": (0, 2), "later": (5, 17)}  # checkpoints at 5, 10, 15, 20
HOW = {"first-epoch": "again", "before-checkpoint": "again", "later": "--resume"}


@pytest.mark.parametrize("window", CLASSIFY_WINDOWS)
def test_kill_classify_then_resume_gives_the_uninterrupted_weights(toy_root, tmp_path, uri, window):
    """3 epochs of 3 steps; the victim dies at a random step of the window."""
    config = _config(tmp_path, toy_root, "classify", workers=0, width=0.125, pretrained=False,
                     input_size=32, batch_size=16, epochs=3, lr=0.01, decay_epochs=[2],
                     checkpoint_epoch=1, contrastive_from_epoch=1, log_every=1)
    kill_resume_compare(
        tmp_path, uri, "classify", config, [], "loss/total", CLASSIFY_WINDOWS[window], 9,
        lambda folder: load_checkpoint(folder / "checkpoints" / "last.pt")["model"], HOW[window])


@pytest.mark.parametrize("window", SEGMENT_WINDOWS)
def test_kill_segment_then_resume_gives_the_uninterrupted_weights(toy_root, tmp_path, uri, window):
    """24 iterations, a checkpoint every 5, dropout on, one DataLoader worker (killed with it)."""
    config = _config(tmp_path, toy_root, "segment", workers=1, width=0.125, pretrained=False,
                     batch_size=4, crop=33, iters=24, lr=0.01, dropout=0.5, log_every=1,
                     val_every=0, checkpoint_every=5)
    kill_resume_compare(
        tmp_path, uri, "segment", config, ["--labels", "gt"], "loss", SEGMENT_WINDOWS[window], 24,
        lambda folder: load_checkpoint(folder / "checkpoints" / "model.pt")["state_dict"], HOW[window])
