"""ONNX Runtime against PyTorch eager on the CPU (target: ORT >= 1.5x), and int8 against fp32.

DeepLab-LargeFOV (VGG16) at full width, 21 classes, 321 x 321 inputs (the training crop), batch
1 and 8, both engines on the same number of threads. The model is exported exactly as
`mcis export` does it; the int8 model is `export.quantize=static`, calibrated on random inputs
(the speed of int8 does not depend on what it was calibrated on). Median of `repeats` runs
after one warm-up.
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
from mcis_cli.stages.export import to_onnx


def _median_s(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RandomCalibration:
    def __init__(self, n: int, size: int):
        rng = np.random.default_rng(0)
        self.batches = iter([{"input": rng.standard_normal((1, 3, size, size), dtype=np.float32)}
                             for _ in range(n)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def main(width: float = 1.0, size: int = 321, batches: tuple[int, ...] = (1, 8), repeats: int = 3,
         int8: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    model = DeepLabLargeFOV(21, width=width).eval()
    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        to_onnx(model, 18, {}).save(fp32, external_data=False)
        sessions = {"onnxruntime fp32": ort.InferenceSession(fp32, options, providers=["CPUExecutionProvider"])}
        if int8:
            quantize_static(fp32, Path(tmp) / "model.int8.onnx", _RandomCalibration(4, size), per_channel=True)
            sessions["onnxruntime int8"] = ort.InferenceSession(
                Path(tmp) / "model.int8.onnx", options, providers=["CPUExecutionProvider"])

        rows, result = [], {}
        for n in batches:
            x = torch.randn(n, 3, size, size)
            with torch.inference_mode():
                eager = _median_s(lambda x=x: model(x), repeats)
                reference = model(x).numpy()
            rows.append(("pytorch eager", n, eager, eager))
            for name, session in sessions.items():
                seconds = _median_s(lambda s=session, x=x: s.run(None, {"input": x.numpy()}), repeats)
                rows.append((name, n, seconds, eager))
                result[f"{name.split()[1]}_speedup_b{n}"] = eager / seconds
            got = sessions["onnxruntime fp32"].run(None, {"input": x.numpy()})[0]
            if np.abs(got - reference).max() > 1e-3:
                raise AssertionError("onnxruntime fp32 and PyTorch disagree beyond 1e-3")
            result[f"eager_ms_b{n}"] = 1000 * eager

    table = Table(title=f"DeepLab-LargeFOV width {width:g}, {size}x{size}, CPU, {threads} threads, "
                        f"median of {repeats}")
    for column in ("engine", "batch", "ms / batch", "images / s", "vs eager"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, n, seconds, eager in rows:
        table.add_row(name, str(n), f"{1000 * seconds:.0f}", f"{n / seconds:.2f}", f"{eager / seconds:.2f}x")
    Console().print(table)
    return result


if __name__ == "__main__":
    main()
