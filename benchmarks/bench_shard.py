"""Sharded stages: `mcis localize` and `mcis evaluate` in one process against two under torchrun.

The same inputs both ways (toy config: localize with 3 partners per class and the self-pairs on
the training images; evaluate of a segmentation model with multi-scale + flip and the dense CRF
on the val images, its CRF pool per rank), runs interleaved 1, 2, 1, 2, ... so both see the
same load; median of the rounds. Time = the stage's MLflow run (end - start): the interpreter's
start and imports, the same either way, are left out. One thread a process both ways (what
torchrun sets), and the CRF workers split over the ranks (`evaluate.jobs` = cores / ranks; 1 runs
the CRF in the rank itself), so both ways have as many busy processes as cores and the ratio is
the sharding's own: on a shared machine a second intra-op thread can cost more than it gives. On a GPU box the ranks are one per GPU (`torchrun --nproc_per_node
<GPUs>`); the ratio here is what two processes get out of this machine's cores.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import scratch_store
from mcis_cli import artifacts, checkpoints, engine, tracking
from mcis_cli.config import load_config
from mcis_cli.data import synth, voc
from mcis_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mcis_cli.models.deeplab import build_segmenter
from mcis_cli.models.mcis import build_classifier

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
TRAIN, VAL = 192, 96
ROUNDS = 3


def _seconds(nproc: int, args: list[str], cfg, stage: str) -> float:
    """Run `mcis ARGS` in `nproc` processes; the duration of the stage run it made."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = max(1, (os.cpu_count() or 1) // nproc)
    command = [sys.executable, *launcher, "-m", "mcis_cli.cli", *args, "--set", f"evaluate.jobs={jobs}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    info = tracking.client(cfg).get_run(tracking.find_runs(cfg, stage)[0].run_id).info
    return (info.end_time - info.start_time) / 1000


def _logged(cfg, stage: str, folder: Path, content: dict) -> str:
    """A finished `stage` run holding the model file `content` (random weights: timing only)."""
    path = folder / stage / Path(artifacts.MODEL).name
    checkpoints.save_checkpoint(path, content)
    with engine.stage_run(cfg, stage) as tracker:
        tracker.log_artifact(path, "checkpoints")
    return tracker.run_id


def main() -> dict[str, float]:
    with scratch_store() as tmp:
        sets = [f"data.root={tmp / 'data'}", f"output_dir={tmp / 'runs'}", "device=cpu", "name=bench-shard"]
        cfg = load_config(CONFIG, sets)
        synth.write(cfg.data.root, seed=0, n_train=TRAIN, n_val=VAL, size=cfg.data.synth.size)
        names = voc.class_names(cfg.data.root)
        torch.manual_seed(0)
        classifier = _logged(cfg, "classify", tmp, artifacts.classifier_file(
            build_classifier(cfg.classify.model_copy(update={"pretrained": False}), len(names)),
            cfg.classify.input_size, "mcis"))
        seg = cfg.segment.model_copy(update={"pretrained": False})
        segmenter = _logged(cfg, "segment", tmp, artifacts.segmenter_file(
            build_segmenter(seg, len(names) + 1), seg, ["background", *names], IMAGENET_MEAN, IMAGENET_STD))
        base = ["--config", str(CONFIG), *(a for s in sets for a in ("--set", s))]
        jobs = {"localize": ["localize", *base, "--from-run", classifier],
                "evaluate": ["evaluate", *base, "--from-run", segmenter]}
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(ROUNDS):
            for stage, args in jobs.items():
                for nproc in (1, 2):
                    times.setdefault((stage, nproc), []).append(_seconds(nproc, args, cfg, stage))
    median = {key: statistics.median(values) for key, values in times.items()}
    result = {}
    table = Table(title=f"sharded stages: toy config, {TRAIN} training / {VAL} val images at "
                        f"{cfg.data.synth.size} px, {os.cpu_count()} cores, 1 thread a process, median of {ROUNDS} interleaved rounds, load average "
                        f"{os.getloadavg()[0]:.1f}")
    for column in ("stage", "1 process s", "2 processes s", "1 / 2"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in jobs:
        one, two = median[stage, 1], median[stage, 2]
        result[f"{stage}_ratio"] = one / two
        table.add_row(stage, f"{one:.2f}", f"{two:.2f}", f"{one / two:.2f}x")
    Console().print(table)
    return result


if __name__ == "__main__":
    main()
