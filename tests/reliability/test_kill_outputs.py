"""kill -9 during `localize`, `pseudolabel`, `evaluate --save` and `export`: never a torn file.

Each victim is a real `mcis` process killed with SIGKILL once it has written a number of files
drawn from a seeded RNG (export: a random moment after its staging folder appears). Then every
file under a final name must be complete (it decodes, and equals the same file of a complete
run), and running the command again completes the work in the same run: localize, pseudolabel
and evaluate reopen the killed run and compute only the missing items (the files that survived
are not written again), export runs again from the start.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mcis_cli.artifacts import load_maps
from mcis_cli.config import load_config
from mcis_cli.data import synth, transforms
from mcis_cli.serving import open_session, read_metadata
from mcis_cli.stages import classify, localize, segment
from tests.reliability import procs

pytestmark = pytest.mark.slow  # real processes, two to five per test: 20-60 s each

N_TRAIN, N_VAL = 96, 48


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> SimpleNamespace:
    """A 96 + 48 image dataset, and finished classify, localize and segment runs (in-process)."""
    tmp = tmp_path_factory.mktemp("kill-outputs")
    root = tmp / "voc"
    synth.write(root, seed=1, n_train=N_TRAIN, n_val=N_VAL, size=64)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = procs.write_config(
        tmp / "config.yaml", name="kill-outputs", seed=0, device="cpu", output_dir=str(tmp / "runs"),
        **{
            "data.root": str(root), "data.workers": 0,
            "classify.width": 0.125, "classify.pretrained": False, "classify.input_size": 32,
            "classify.batch_size": 16, "classify.epochs": 1, "classify.checkpoint_epoch": 0,
            "localize.partners": 1, "localize.batch_size": 8, "localize.cache_mb": 64,
            "pseudolabel.background": "saliency", "pseudolabel.saliency": "computed",
            "segment.width": 0.125, "segment.pretrained": False, "segment.batch_size": 4,
            "segment.crop": 33, "segment.iters": 4, "segment.val_every": 0,
            "segment.checkpoint_every": 4,
            "evaluate.scales": [1.0], "evaluate.flip": True, "evaluate.crf": True, "evaluate.jobs": 1,
            "evaluate.window": 0, "evaluate.overlays": 2,
            "export.parity_sizes": [[1, 33, 33]], "export.register_model": False,
            "tracking.flush_every": 10,
        })
    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children: two threads on two shared cores only contend
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            patch.chdir(tmp)
            classified = classify.run(cfg).run_id
            located = localize.run(cfg, from_run=classified).run_id
            segmented = segment.run(cfg, labels="gt").run_id  # the quickest model: the ceiling
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(tmp=tmp, root=root, uri=uri, config=config, cfg=cfg, classify=classified,
                           localize=located, segment=segmented, env=procs.env(uri))


def _new_folder(chain, pattern: str, before: set[Path]) -> Path | None:
    found = [p for p in (chain.tmp / "runs").glob(pattern) if p not in before]
    return found[0] if found else None


def _kill_after_files(chain, name: str, args: list[str], pattern: str, files: str, total: int):
    """Start `mcis args`, SIGKILL it once `k` (seeded) files match `pattern/files`; return the
    victim's folder and k."""
    k = procs.kill_point(name, 1, total * 2 // 3)
    before = set((chain.tmp / "runs").glob(pattern))
    log = chain.tmp / f"{name}.log"
    victim = procs.start(args, chain.tmp, chain.env, log)

    def written():
        folder = _new_folder(chain, pattern, before)
        return folder if folder is not None and len(procs.finals(folder, files)) >= k else None

    folder = procs.wait_until(written, victim, log, f"{k} files of {name}", poll=0.01, freeze=True)
    assert victim.poll() is None, f"{name} finished before the kill"
    procs.kill(victim)
    return folder, k


def _status(chain, run_id: str) -> str:
    return MlflowClient(chain.uri).get_run(run_id).info.status


def test_kill_localize_then_rerun_computes_only_the_missing_maps(chain):
    args = ["localize", "--config", chain.config, "--from-run", chain.classify]
    maps, k = _kill_after_files(chain, "localize", args, "*/maps", "*.npz", N_TRAIN)
    run_id = maps.parent.name
    have = procs.finals(maps, "*.npz")
    done = procs.finals(maps.parent / "records" / "localize", "*.npz")  # items finished: map and record
    for path in have:  # every file under a final name is complete
        loaded, classes = load_maps(path)
        assert loaded.ndim == 3 and len(loaded) == len(classes)
    again = procs.run(args, chain.tmp, chain.env)
    assert again.returncode == 0, again.output[-3000:]
    assert f"localize run {run_id} was left RUNNING" in again.output  # closed, then reopened
    run = MlflowClient(chain.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["maps/computed"] == N_TRAIN - len(done)  # only the unfinished ones
    assert len(procs.finals(maps, "*.npz")) == N_TRAIN and not list(maps.glob(".*"))  # partials removed
    reference = chain.tmp / "runs" / chain.localize / "maps"
    for path in procs.finals(maps, "*.npz"):  # what survived and what was added: an uninterrupted run's
        np.testing.assert_array_equal(load_maps(path)[0], load_maps(reference / path.name)[0])
    procs.record("localize", f"after {k} of {N_TRAIN} maps", rerun="same run, missing maps only",
                 lost="nothing")


def _same_pngs(partial: Path, complete: Path) -> int:
    """Every PNG of the killed run decodes and equals the complete run's; returns how many."""
    names = [p.name for p in procs.finals(partial, "*.png")]
    for name in names:
        np.testing.assert_array_equal(transforms.read_index_png(partial / name),
                                      transforms.read_index_png(complete / name))
    return len(names)


# stage, input run, extra arguments, output folder, items, the metrics that must come out the same
PER_ITEM = {
    "pseudolabel": ("localize", [], "pseudo", N_TRAIN, "pseudo/"),
    "evaluate": ("segment", ["--save"], "masks", N_VAL, "iou/"),
}


@pytest.mark.parametrize("stage", PER_ITEM)
def test_kill_a_per_item_stage_then_rerun_completes_the_same_run(chain, stage):
    """Run again, the killed run finishes without redoing the items it had finished; run once more
    (a new, uninterrupted run, since a finished run is never reopened), every mask and score is equal."""
    source, extra, outputs, total, prefix = PER_ITEM[stage]
    args = [stage, "--config", chain.config, "--from-run", getattr(chain, source), *extra]
    folder, k = _kill_after_files(chain, stage, args, f"*/{outputs}", "*.png", total)
    killed = folder.parent.name
    records = folder.parent / "records" / stage  # an item is done once its record is written
    survived = {p: p.stat().st_mtime_ns for p in procs.finals(folder, "*.png")
                if (records / f"{p.stem}.npz").is_file()}
    again = procs.run(args, chain.tmp, chain.env)
    assert again.returncode == 0, again.output[-3000:]
    assert f"run {killed} was left RUNNING" in again.output  # closed, then reopened
    assert _status(chain, killed) == "FINISHED"
    assert len(procs.finals(folder, "*.png")) == total and not list(folder.glob(".*"))
    assert all(p.stat().st_mtime_ns == t for p, t in survived.items()), "a finished item was done again"

    reference = procs.run(args, chain.tmp, chain.env)
    assert reference.returncode == 0, reference.output[-3000:]
    mlc = MlflowClient(chain.uri)
    [newest] = mlc.search_runs([mlc.get_experiment_by_name("kill-outputs").experiment_id],
                               f"tags.`mcis.stage` = '{stage}' and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    assert newest.info.run_id != killed
    assert _same_pngs(folder, chain.tmp / "runs" / newest.info.run_id / outputs) == total
    ours, theirs = mlc.get_run(killed).data.metrics, newest.data.metrics
    keys = [key for key in ours if key.startswith(prefix)]
    assert keys and all(ours[key] == theirs[key] for key in keys)
    procs.record(stage, f"after {k} of {total} files", rerun="same run, missing items only", lost="nothing")


def _exports(chain) -> list:
    mlc = MlflowClient(chain.uri)
    return mlc.search_runs([mlc.get_experiment_by_name("kill-outputs").experiment_id],
                           "tags.`mcis.stage` = 'export'")


def _staging(out: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir()]


def test_kill_export_never_leaves_a_torn_model(chain):
    """A first export (the model being served) times the window from its staging folder to its
    exit; the victim is killed at a seeded random moment of that window."""
    out = chain.tmp / "served" / "model.onnx"
    args = ["export", "--config", chain.config, "--from-run", chain.segment, "--out", out, "--ceiling"]
    log = chain.tmp / "export.log"
    first = procs.start(args, chain.tmp, chain.env, log)
    procs.wait_until(lambda: _staging(out), first, log, "the export's staging folder", poll=0.01)
    staged_at = time.monotonic()
    assert first.wait(procs.TIMEOUT) == 0, procs.tail(log)
    window = time.monotonic() - staged_at
    mtime = out.stat().st_mtime_ns
    delay = random.Random(f"{procs.SEED}:export").uniform(0.0, 0.8 * window)
    for _ in range(4):  # an export faster than the first one is a complete export: try again, sooner
        victim = procs.start(args, chain.tmp, chain.env, log)
        procs.wait_until(lambda: _staging(out), victim, log, "the export's staging folder", poll=0.01)
        time.sleep(delay)
        if victim.poll() is None:
            break
        delay /= 2
    assert victim.poll() is None, f"every export finished within {delay:.2f} s of staging"
    procs.kill(victim)
    # the served model is the old one or a complete new one, never a torn one
    open_session(out, "cpu")
    assert read_metadata(out)["source_run"] == chain.segment
    replaced = out.stat().st_mtime_ns != mtime
    before = _exports(chain)
    victims = [r.info.run_id for r in before if r.info.status == "RUNNING"]  # none: killed after its run finished
    again = procs.run(args, chain.tmp, chain.env)
    assert again.returncode == 0, again.output[-3000:]
    open_session(out, "cpu")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # staging cleaned up
    exports = _exports(chain)
    assert len(exports) == len(before) + (not victims) and {r.info.status for r in exports} == {"FINISHED"}
    assert all(f"run {run_id} was left RUNNING" in again.output for run_id in victims)  # reopened
    procs.record("export", f"{delay:.2f} s of a {window:.2f} s write window",
                 replaced_before_kill=replaced, rerun="same run, from the start" if victims else "new run",
                 lost="nothing")
