"""Localization maps: the §2.8 fusion on hand-made maps, cached == naive, determinism, atomic
files, and the stage itself (outputs, quality report, completing a killed run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mcis_cli import artifacts, checkpoints, engine, tracking
from mcis_cli.config import load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.mcis import MCISNet
from mcis_cli.stages import localize
from tests import ranks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
SIZE = 32  # classifier input: 4x4 features, fast on two cores


# ---- fusion ----------------------------------------------------------------------------------
def test_fuse_normalises_gates_and_always_divides_by_the_map_count():
    one = torch.tensor([[0.0, 2.0], [4.0, -1.0]])  # ReLU, then / 4
    maps = torch.stack([one, 10 * one, -one, one.T])[:, None]  # (M=4, n=1, 2, 2)
    scores = torch.tensor([[-5.0], [0.0], [0.0], [-5.0]])  # sigmoid: 0.007, 0.5, 0.5, 0.007
    fused = localize.fuse(maps, scores, gate=0.1)
    norm = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # -one: only the -1 entry survives ReLU
    # map 1 always, map 2 (= map 1 after normalising) and map 3 pass the gate, map 4 does not
    torch.testing.assert_close(fused[0], (norm + norm + neg) / 4)
    # gate 0.6: only the first map, still divided by 4 (the official dim map of issue #17)
    torch.testing.assert_close(localize.fuse(maps, scores, gate=0.6)[0], norm / 4)


def test_fuse_is_per_class_and_an_all_negative_map_adds_nothing():
    maps = torch.stack([torch.ones(2, 3, 3), -torch.ones(2, 3, 3)])
    maps[0, 1] *= 3
    scores = torch.zeros(2, 2)
    fused = localize.fuse(maps, scores, gate=0.1)
    assert fused.shape == (2, 3, 3)
    torch.testing.assert_close(fused, torch.full((2, 3, 3), 0.5))


def test_cam_maps_relu_and_max_normalise_per_class():
    cams = torch.tensor([[[-1.0, 1.0], [2.0, 4.0]], [[0.5, 0.0], [0.0, 0.0]]])
    out = localize.cam_maps(cams)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_to_image_size_is_float32_in_unit_range():
    maps = torch.zeros(2, 4, 4)
    maps[:, 1:3, 1:3] = 1  # bicubic overshoots around a step; the result is clipped
    out = localize.to_image_size(maps, (37, 23))
    assert out.dtype == np.float32 and out.shape == (2, 37, 23)
    assert out.min() >= 0 and out.max() <= 1 and out.max() > 0.9
    assert localize.to_image_size(torch.zeros(0, 4, 4), (5, 6)).shape == (0, 5, 6)


# ---- the two computation paths ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_samples(toy_root: Path):
    torch.manual_seed(0)
    samples = voc.train_samples(load_config(CONFIG, [f"data.root={toy_root}"]).data)[:10]
    return MCISNet(len(voc.class_names(toy_root)), 0.125).eval(), samples


def _maps(model, samples, **kwargs):
    items = localize.plan(samples, kwargs.pop("partners", 2), seed=0)
    return {item.sample.id: maps for item, maps in localize.compute_maps(model, items, samples, SIZE, **kwargs)}


def test_plan_draws_partners_of_the_class_deterministically(model_and_samples):
    _, samples = model_and_samples
    a, b = localize.plan(samples, 3, seed=0), localize.plan(samples, 3, seed=0)
    assert a == b
    assert localize.plan(samples, 3, seed=1) != a
    for item in a:
        assert len(item.partners) == len(item.sample.labels)
        for c, partners in zip(item.sample.labels, item.partners, strict=True):
            assert len(partners) == 3 and all(c in samples[j].labels for j in partners)


@pytest.mark.parametrize("self_pairs,partners", [(True, 2), (False, 2), (True, 0)])
def test_cached_maps_equal_naive_maps(model_and_samples, self_pairs, partners):
    model, samples = model_and_samples
    cache = localize.FeatureCache(model, samples, SIZE, torch.device("cpu"), budget_mb=1, batch=4)
    cached = _maps(model, samples, partners=partners, self_pairs=self_pairs, batch_size=4, cache=cache)
    naive = _maps(model, samples, partners=partners, self_pairs=self_pairs, naive=True)
    assert cache.hits > 0 or not partners  # partners were reused, not recomputed
    for image_id, maps in cached.items():
        assert maps.shape == naive[image_id].shape
        assert np.abs(maps - naive[image_id]).max() <= 1e-5
    if not self_pairs:  # the cross-image map alone: max-normalised, divided by one
        assert all(np.isclose(m.max(), 1, atol=0.05) for m in cached.values() if m.any())


def test_tiny_cache_evicts_and_still_gives_the_same_maps(model_and_samples):
    model, samples = model_and_samples
    big = localize.FeatureCache(model, samples, SIZE, torch.device("cpu"), budget_mb=64)
    tiny = localize.FeatureCache(model, samples, SIZE, torch.device("cpu"), budget_mb=0, batch=4)
    a = _maps(model, samples, cache=big, batch_size=4)
    b = _maps(model, samples, cache=tiny, batch_size=4)
    assert not tiny.store and tiny.misses > big.misses
    assert all(np.abs(a[k] - b[k]).max() <= 1e-5 for k in a)


class _MetaCache(localize.FeatureCache):
    """Features of VOC's full-width 256 px shape (512 x 32 x 32 float32, 2 MiB) without memory."""

    def compute(self, indices):
        return torch.empty(len(indices), 512, 32, 32, device="meta")


def test_cache_stays_within_its_budget_and_evicts_the_least_recently_used():
    cache = _MetaCache(None, [], 256, torch.device("meta"), budget_mb=5)  # 2 entries fit
    cache.get([0, 1])
    cache.get([0])  # 0 is now the most recent
    cache.get([2, 3, 4, 2])
    assert cache.peak <= cache.budget and cache.bytes <= cache.budget
    assert list(cache.store) == [3, 4] and cache.bytes == 2 * 2**21
    cache.get([4, 0])
    assert list(cache.store) == [4, 0] and (cache.hits, cache.misses) == (3, 6)


def test_padded_appends_zero_rows_up_to_the_batch():
    x = torch.ones(2, 3)
    assert torch.equal(localize.padded(x, 4), torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3] * 2))
    assert localize.padded(x, 2) is x


def test_fixed_batches_run_every_batch_at_one_shape_and_return_the_real_rows():
    shapes = []

    def forward(x):
        shapes.append(tuple(x.shape))
        return 2 * x

    x = torch.arange(10.0).reshape(5, 2)
    out = localize.fixed_batches(forward, x, 4)
    assert shapes == [(4, 2), (4, 2)]  # the last batch, one row, padded to four
    assert torch.equal(out, 2 * x)


def test_rows_independent_catches_a_forward_that_mixes_rows_or_reads_positions():
    x = torch.randn(4, 3)
    assert localize.rows_independent(lambda b: b.exp(), x)
    assert not localize.rows_independent(lambda b: b + b.mean(0), x)  # as BatchNorm in training mode
    assert not localize.rows_independent(lambda b: b + torch.arange(len(b))[:, None], x)


def test_an_images_features_are_the_same_bits_alone_among_strangers_anywhere_and_after_a_resume(
        model_and_samples):
    model, samples = model_and_samples

    def features(asked, index, batch=4):
        cache = localize.FeatureCache(model, samples, SIZE, torch.device("cpu"), 64, batch=batch)
        return cache.get(asked)[asked.index(index)]

    alone = features([3], 3)  # with three rows of padding
    assert torch.equal(features([7, 1, 3, 9, 0], 3), alone)  # third of a batch of strangers
    assert torch.equal(features([0, 1, 2, 4, 5, 6, 7, 8, 9, 3], 3), alone)  # last, in the third batch
    assert torch.equal(features([2, 3], 3), alone)  # a new cache: another shard, a resumed start


def test_a_device_that_mixes_the_rows_of_a_batch_falls_back_to_one_image_at_a_time(
        model_and_samples, monkeypatch):
    _, samples = model_and_samples
    notes = []
    monkeypatch.setattr(localize, "note", notes.append)

    class Mixing(torch.nn.Module):
        def features(self, x):
            return x[:, :, ::8, ::8] + x.mean(0)[:, ::8, ::8]

    cache = localize.FeatureCache(Mixing(), samples, SIZE, torch.device("cpu"), 64, batch=4)
    got = cache.get([0, 1, 2])
    assert cache.batch == 1 and len(notes) == 1 and "one at a time" in notes[0]
    for i, feature in enumerate(got):
        x = localize.view(transforms.load_image(samples[i].image), SIZE)[None]
        assert torch.equal(feature, Mixing().features(x)[0])
    cache.get([3, 4])
    assert len(notes) == 1  # checked once


def test_same_inputs_give_identical_maps(model_and_samples, tmp_path):
    model, samples = model_and_samples
    first, second = _maps(model, samples, batch_size=4), _maps(model, samples, batch_size=4)
    for image_id, maps in first.items():
        np.testing.assert_array_equal(maps, second[image_id])
        artifacts.save_maps(tmp_path / "a" / f"{image_id}.npz", maps, (0,) * len(maps))
        artifacts.save_maps(tmp_path / "b" / f"{image_id}.npz", second[image_id], (0,) * len(maps))
        a, b = artifacts.load_maps(tmp_path / "a" / f"{image_id}.npz"), artifacts.load_maps(tmp_path / "b" / f"{image_id}.npz")
        np.testing.assert_array_equal(a[0], b[0])


def test_cam_method_gives_max_normalised_maps(model_and_samples):
    model, samples = model_and_samples
    for maps in _maps(model, samples, method="cam", batch_size=4).values():
        assert maps.min() >= 0 and maps.max() <= 1


# ---- files -----------------------------------------------------------------------------------
def test_save_maps_round_trip(tmp_path):
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    artifacts.save_maps(tmp_path / "x.npz", maps, [3, 1])
    loaded, classes = artifacts.load_maps(tmp_path / "x.npz")
    assert loaded.dtype == np.float16 and classes.tolist() == [3, 1]
    assert np.abs(loaded - maps).max() < 1e-3


def test_a_kill_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def torn(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", torn)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_maps(tmp_path / "maps" / "a.npz", np.zeros((1, 4, 4), np.float32), [0])
    assert list((tmp_path / "maps").iterdir()) == []


# ---- the stage -------------------------------------------------------------------------------
def _classify_run(cfg, tmp_path: Path, num_classes: int, method: str = "mcis") -> str:
    """A finished classify run holding a randomly initialised checkpoint (no training needed)."""
    torch.manual_seed(0)
    model = MCISNet(num_classes, 0.125)
    path = tmp_path / "model.pt"
    checkpoints.save_checkpoint(path, {"state_dict": model.state_dict(), "num_classes": num_classes,
                                   "width": 0.125, "input_size": SIZE, "method": method})
    with engine.stage_run(cfg, "classify") as tracker:
        tracker.log_artifact(path, "checkpoints")
    return tracker.run_id


def _sets(toy_root, tmp_path) -> list[str]:
    return ["name=loctest", "device=cpu", f"output_dir={tmp_path / 'runs'}", f"data.root={toy_root}",
            "localize.partners=1", "localize.batch_size=8", "localize.feature_batch=4", "tracking.flush_every=1"]


@pytest.fixture
def stage_cfg(toy_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return load_config(CONFIG, _sets(toy_root, tmp_path))


@pytest.mark.slow
def test_stage_writes_maps_reports_quality_and_completes_a_killed_run(stage_cfg, toy_root, tmp_path, monkeypatch):
    k = len(voc.class_names(toy_root))
    classify_id = _classify_run(stage_cfg, tmp_path, k)
    samples = voc.train_samples(stage_cfg.data)

    saved = []
    real_save = artifacts.save_maps

    def dying_save(path, maps, classes):
        if len(saved) == 10:
            raise KeyboardInterrupt  # killed after 10 files
        real_save(path, maps, classes)
        saved.append(path)

    monkeypatch.setattr(artifacts, "save_maps", dying_save)
    with pytest.raises(KeyboardInterrupt):
        localize.run(stage_cfg, from_run=classify_id)
    monkeypatch.setattr(artifacts, "save_maps", real_save)
    killed = saved[0].parent.parent.name

    result = localize.run(stage_cfg, from_run=classify_id)
    assert result.run_id == killed  # the interrupted run was completed, not started afresh
    run = tracking.resolve_run(stage_cfg, "localize", result.run_id)
    assert run.metrics["maps/computed"] == len(samples) - 10
    assert {"maps/miou", "maps/best_threshold"} <= set(run.metrics)
    assert any(key.startswith("maps/iou/") for key in run.metrics)
    maps_dir = run.fetch("maps")
    assert sorted(p.stem for p in maps_dir.glob("*.npz")) == sorted(s.id for s in samples)
    assert run.fetch("maps_overlays.png").is_file()

    # a finished run is not reopened: the next start is a new run, with the same maps
    again = localize.run(stage_cfg, from_run=classify_id)
    assert again.run_id != killed
    other = tracking.resolve_run(stage_cfg, "localize", again.run_id).fetch("maps")
    for sample in samples[:5]:
        np.testing.assert_array_equal(artifacts.load_maps(maps_dir / f"{sample.id}.npz")[0],
                                      artifacts.load_maps(other / f"{sample.id}.npz")[0])


# rank 1 kills itself (SIGKILL) as it is about to write its third file
DYING_RANK = """
import os, signal, sys
from mcis_cli.cli import main
from mcis_cli import artifacts
real, written = artifacts.save_maps, []
def save(*args):
    if os.environ["RANK"] == "1" and len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args)
    written.append(args[0])
artifacts.save_maps = save
sys.argv[0] = "mcis"
main()
"""


def _all_maps(run: tracking.SourceRun) -> dict[str, np.ndarray]:
    return {p.stem: artifacts.load_maps(p)[0] for p in sorted(run.fetch("maps").glob("*.npz"))}


@pytest.mark.slow
def test_two_ranks_give_the_maps_of_one_and_one_process_completes_a_killed_rank(
        stage_cfg, toy_root, tmp_path):
    classify_id = _classify_run(stage_cfg, tmp_path, len(voc.class_names(toy_root)))
    samples = voc.train_samples(stage_cfg.data)
    one = localize.run(stage_cfg, from_run=classify_id)
    args = ["localize", "--config", str(CONFIG), "--from-run", classify_id]
    args += [a for s in _sets(toy_root, tmp_path) for a in ("--set", s)]
    done = ranks.torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tracking.find_runs(stage_cfg, "localize")
    assert len(runs) == 2  # rank 1 opened no run of its own
    two, single = runs[0], tracking.resolve_run(stage_cfg, "localize", one.run_id)
    reference = _all_maps(single)
    assert len(reference) == len(samples)
    for image_id, maps in _all_maps(two).items():
        assert np.abs(maps.astype(np.float32) - reference[image_id]).max() <= 1e-6
    assert _all_maps(two).keys() == reference.keys()
    for key, value in single.metrics.items():
        if key not in ("maps/cache_hit_rate", "maps/cache_peak_mb") and not key.startswith("system/"):  # per process
            assert two.metrics[key] == value, key
    mlc = tracking.client()
    assert ([m.value for m in mlc.get_metric_history(two.run_id, "maps/sweep_miou")]
            == [m.value for m in mlc.get_metric_history(single.run_id, "maps/sweep_miou")])

    # no agent to stop rank 0 when rank 1 dies: it waits MCIS_DIST_TIMEOUT, then says so in one line
    killed = ranks.by_hand(DYING_RANK, args, MCIS_DIST_TIMEOUT="15")
    assert killed[1].returncode == -9
    assert killed[0].returncode == 2 and "Traceback" not in killed[0].stderr, killed[0].stderr[-3000:]
    line = killed[0].stderr.strip().splitlines()[-1]
    assert "rank 1 of 2 stopped" in line and "start `mcis localize --config" in line
    failed = tracking.find_runs(stage_cfg, "localize", finished=False)
    assert len(failed) == 1
    partial = engine.workdir(stage_cfg, failed[0].run_id) / artifacts.MAPS
    assert 2 <= len(list(partial.glob("*.npz"))) < len(samples)
    assert not list(partial.glob(".*"))  # nothing half-written

    resumed = localize.run(stage_cfg, from_run=classify_id)  # one process writes what is missing
    assert resumed.run_id == failed[0].run_id
    run = tracking.resolve_run(stage_cfg, "localize", resumed.run_id)
    assert 0 < run.metrics["maps/computed"] < len(samples)
    maps = _all_maps(run)
    assert maps.keys() == reference.keys()
    for image_id, m in maps.items():
        np.testing.assert_array_equal(m, reference[image_id])


def test_stage_refuses_mcis_maps_from_a_cam_checkpoint(stage_cfg, toy_root, tmp_path):
    classify_id = _classify_run(stage_cfg, tmp_path, len(voc.class_names(toy_root)), method="cam")
    with pytest.raises(McisError, match="localize.method=cam"):
        localize.run(stage_cfg, from_run=classify_id)


def test_stage_refuses_no_pairs_at_all_before_touching_the_store(stage_cfg, tmp_path):
    cfg = stage_cfg.model_copy(deep=True)
    cfg.localize.partners, cfg.localize.self_pairs = 0, False
    with pytest.raises(McisError, match="self_pairs"):
        localize.run(cfg, from_run="no-such-run")
    assert not (tmp_path / "mlflow.db").exists()
