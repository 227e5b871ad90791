"""ONNX Runtime against PyTorch eager on the CPU (target: ORT >= 1.5x), int8 against fp32, and on a
GPU (when the CUDA execution provider really starts) CUDA fp32 against fp16.

DeepLab-LargeFOV (VGG16) at full width, 21 classes, 321 x 321 inputs (the training crop), batch
1 and 8, every engine on the same number of threads. The models are exported exactly as
`mcis export` does it; the int8 model is `export.quantize=static`, calibrated on random inputs
(the speed of int8 does not depend on what it was calibrated on), the fp16 one
`export.precision=fp16`. The engines run interleaved, one call each per round, so a slow patch
of a shared machine slows them all alike; each figure is the median over the rounds after one
warm-up call. The fp16 model's parity with PyTorch fp32 on the CPU is printed as `export`
checks it (max abs logit difference, and relative to the largest logit).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import quantize_static
from rich.console import Console
from rich.table import Table

from mcis_cli.models.deeplab import DeepLabLargeFOV
from mcis_cli.serving import CPU, CUDA
from mcis_cli.stages.export import Fp16, parity, to_onnx


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each engine, timed one call each per round after a warm-up."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class _RandomCalibration:
    def __init__(self, n: int, size: int):
        rng = np.random.default_rng(0)
        self.batches = iter([{"input": rng.standard_normal((1, 3, size, size), dtype=np.float32)}
                             for _ in range(n)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    return ort.InferenceSession(path, options, providers=providers)


def _table(title: str, rows: list[tuple[str, int, float, float]], reference: str) -> Table:
    table = Table(title=title)
    for column in ("engine", "batch", "ms / batch", "images / s", f"vs {reference}"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, n, seconds, base in rows:
        table.add_row(name, str(n), f"{1000 * seconds:.0f}", f"{n / seconds:.2f}", f"{base / seconds:.2f}x")
    return table


def main(width: float = 1.0, size: int = 321, batches: tuple[int, ...] = (1, 8), rounds: int = 3,
         int8: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    model = DeepLabLargeFOV(21, width=width).eval()
    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    console, result = Console(), {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp16 = Path(tmp) / "model.onnx", Path(tmp) / "model.fp16.onnx"
        to_onnx(model, 18, {}).save(fp32, external_data=False)
        to_onnx(Fp16(model).eval(), 18, {}).save(fp16, external_data=False)
        sessions = {"onnxruntime fp32": _session(fp32, options, [CPU])}
        if int8:
            quantize_static(fp32, Path(tmp) / "model.int8.onnx", _RandomCalibration(4, size), per_channel=True)
            sessions["onnxruntime int8"] = _session(Path(tmp) / "model.int8.onnx", options, [CPU])
        cuda = {}
        if CUDA in ort.get_available_providers():
            cuda = {"cuda fp32": _session(fp32, options, [CUDA, CPU]),
                    "cuda fp16": _session(fp16, options, [CUDA, CPU])}
            used = {name: s.get_providers()[0] for name, s in cuda.items()}
            console.print(f"CUDA sessions run on: {used}")
            cuda = {name: s for name, s in cuda.items() if used[name] == CUDA}

        check = parity(model, _session(fp16, options, [CPU]), [[1, size, size]], prefix="fp16")
        result.update({k: v for k, v in check.items() if k.startswith("fp16/")})
        console.print(f"fp16 vs PyTorch fp32 on the CPU at 1x{size}x{size}: max abs logit difference "
                      f"{result['fp16/max_abs_diff']:.3g}, {result['fp16/max_rel_diff']:.3g} of the largest "
                      f"logit, argmax agreement {result['fp16/argmax_agree']:.4f}")

        rows, gpu_rows = [], []
        for n in batches:
            x = torch.randn(n, 3, size, size)
            feed = {"input": x.numpy()}
            calls = {"pytorch eager": lambda x=x: model(x)}
            calls.update({name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in sessions.items()})
            with torch.inference_mode():
                seconds = interleaved_medians(calls, rounds)
                reference = model(x).numpy()
            got = sessions["onnxruntime fp32"].run(None, feed)[0]
            if np.abs(got - reference).max() > 1e-3:
                raise AssertionError("onnxruntime fp32 and PyTorch disagree beyond 1e-3")
            rows += [(name, n, s, seconds["pytorch eager"]) for name, s in seconds.items()]
            result.update({f"{name.split()[1]}_speedup_b{n}": seconds["pytorch eager"] / s
                           for name, s in seconds.items() if name != "pytorch eager"})
            if cuda:
                gpu = interleaved_medians({name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in cuda.items()}, rounds)
                gpu_rows += [(name, n, s, gpu["cuda fp32"]) for name, s in gpu.items()]
                result[f"cuda_fp16_speedup_b{n}"] = gpu["cuda fp32"] / gpu["cuda fp16"]

    console.print(_table(f"DeepLab-LargeFOV width {width:g}, {size}x{size}, CPU, {threads} threads, "
                         f"interleaved, median of {rounds}", rows, "eager"))
    if gpu_rows:
        console.print(_table(f"the same on CUDA, interleaved, median of {rounds}", gpu_rows, "cuda fp32"))
    else:
        console.print("CUDA fp32 vs fp16: not measured (no CUDA execution provider started here)")
    return result


if __name__ == "__main__":
    main()
