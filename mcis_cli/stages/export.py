"""`mcis export`: the trained segmenter as one self-contained ONNX file, verified and registered.

The graph keeps batch, height and width dynamic, and its metadata carries the class names and
the normalisation, so `mcis predict` (or any ONNX consumer) needs nothing else. The file is
checked before it takes its final name: the ONNX checker, then ONNX Runtime against PyTorch at
`export.parity_sizes`; beyond `export.tolerance` the stage fails and leaves no model behind.
`export.precision: fp16` adds a half-precision copy for GPUs, checked the same way against
PyTorch fp32 (relative tolerance); the registered MLflow model serves the chosen precision
(`mcis_cli/tracking/pyfunc_model.py`: images in, masks out), beside the plain ONNX flavour.
It is registered under `export.model_name` and, when it is the method's, becomes that name's
`@challenger`; serving follows `@champion`, which `mcis promote` moves (tracking/registry.py).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn
from torch.export import Dim

from mcis_cli import __version__, artifacts, engine, metrics, tracking
from mcis_cli.config import Config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.progress import console
from mcis_cli.serving import JSON_KEYS, infer, open_session, preprocess, read_metadata
from mcis_cli.stages import StageResult

CALIBRATION_IMAGES = 16  # training images that set the int8 activation ranges (static mode)


def to_onnx(model: nn.Module, opset: int, metadata: dict[str, str]) -> torch.onnx.ONNXProgram:
    """Export with the dynamo exporter (TorchScript export is deprecated); traced at batch 2 and an
    odd size so that no dimension is specialised."""
    example = torch.randn(2, 3, 67, 83)
    try:
        program = torch.onnx.export(
            model.eval(), (example,), input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},),
            opset_version=opset, dynamo=True, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - torch.export and onnxscript raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "" if opset == 18 else " (try export.opset=18, the exporter's own opset)"
        raise McisError(f"ONNX export failed at opset {opset}: {first}{hint}") from None
    program.model.metadata_props.update(metadata)
    return program


def model_metadata(meta: dict, source_run: str, opset: int) -> dict[str, str]:
    """What a consumer needs besides the graph, as metadata_props strings."""
    fields = {
        "class_names": meta["class_names"], "num_classes": meta["num_classes"],
        "mean": meta["mean"], "std": meta["std"],
        "color_order": "RGB", "value_range": "0-1 then (x-mean)/std", "layout": "NCHW",
        "output": "logits (N, num_classes, H, W) at input size; argmax = class index",
        "arch": meta["arch"], "source_run": source_run, "opset": opset, "mcis_version": __version__,
    }
    return {k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in fields.items()}


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield a path in a temporary folder beside `target`; on success move everything written
    there into place, the .onnx last, so a kill never leaves a torn file under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*"):  # left by a killed export (run() locks)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield folder / target.name
        files = sorted(folder.iterdir(), key=lambda p: p.name == target.name)  # weights first
        for path in files:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for path in files:
            os.replace(path, target.parent / path.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def parity(model: nn.Module, session, sizes: list[list[int]], seed: int = 0, prefix: str = "parity") -> dict:
    """ONNX Runtime vs PyTorch logits on random inputs of each (N, H, W): the max abs difference,
    the same relative to the largest PyTorch logit (`max_rel_diff`, what bounds fp16) and argmax
    agreement, under `prefix/`. No timing: a few calls beside other work are too noisy to compare;
    `python -m benchmarks onnx` measures the speed (interleaved, equal threads, median)."""
    generator = torch.Generator().manual_seed(seed)
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "argmax_agree": 1.0}
    report = {"sizes": {}}
    for n, h, w in sizes:
        x = torch.randn(n, 3, h, w, generator=generator)
        expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        size = {"max_abs_diff": diff, "max_rel_diff": diff / max(float(np.abs(expected).max()), 1e-12),
                "argmax_agree": float((got.argmax(1) == expected.argmax(1)).mean())}
        report["sizes"][f"{n}x{h}x{w}"] = size
        worst = {k: (min if k == "argmax_agree" else max)(v, size[k]) for k, v in worst.items()}
    report.update({f"{prefix}/{k}": v for k, v in worst.items()})
    return report


class Fp16(nn.Module):
    """The segmenter in half precision behind float32 inputs and outputs: the casts are the
    graph's first and last nodes, so clients feed and read float32 whatever the precision."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


# what bounds each check of `save_checked`: the metric (under its prefix) and the export.* setting
BOUNDS = {"parity": ("max_abs_diff", "tolerance"), "fp16": ("max_rel_diff", "fp16_tolerance")}


def save_checked(program: torch.onnx.ONNXProgram, target: Path, model: nn.Module, cfg: Config,
                 tracker, prefix: str = "parity") -> dict[str, float]:
    """Write `program` as `target` once ONNX Runtime on it agrees with PyTorch fp32 at
    `export.parity_sizes` (fp32: max abs logit difference; fp16: the same relative to the largest
    logit); otherwise the stage fails and nothing is left under `target`."""
    metric, setting = BOUNDS[prefix]
    bound = getattr(cfg.export, setting)
    with staged(target) as tmp:
        program.save(tmp, external_data=False)  # external data only beyond protobuf's 2 GB
        session, _ = open_session(tmp, "cpu")
        report = parity(model, session, cfg.export.parity_sizes, prefix=prefix)
        scores = {k: v for k, v in report.items() if k != "sizes"}
        tracker.log_metrics(scores)
        tracker.log_dict(report, f"{prefix}.json")
        if scores[f"{prefix}/{metric}"] > bound:
            raise McisError(
                f"ONNX Runtime ({target.name}) and PyTorch disagree: {metric} of the logits "
                f"{scores[f'{prefix}/{metric}']:.3g} > export.{setting} {bound:g} "
                f"(per size: {report['sizes']}); no model written"
            )
    return scores


def example_png(size: int = 64) -> bytes:
    """A PNG of coloured blocks: the served model's input example, run once when it is logged."""
    rng = np.random.default_rng(0)
    rgb = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def source_miou(cfg: Config, source: tracking.SourceRun) -> tuple[float, str] | None:
    """mIoU of the segment run: its latest evaluate run's, else its own `val/miou`."""
    evaluated = tracking.find_runs(cfg, "evaluate", **{tracking.SOURCE_TAG: source.run_id})
    for run in evaluated:
        if "miou" in run.metrics:
            return run.metrics["miou"], f"evaluate run {run.run_id}"
    if "val/miou" in source.metrics:
        return source.metrics["val/miou"], f"segment run {source.run_id} val/miou"
    return None


class _Calibration:
    """onnxruntime CalibrationDataReader over a few training images, one per batch."""

    def __init__(self, images: list[Path], meta: dict):
        self.batches = (preprocess(transforms.load_image(path)[None], meta) for path in images)

    def get_next(self) -> dict | None:
        x = next(self.batches, None)
        return None if x is None else {"input": x}


def quantize(fp32: Path, meta: dict, calibration: list[Path]) -> Path:
    """int8 copy of the model beside it: static (QDQ, activation ranges calibrated on the given
    images) or, with no images, dynamic (weights only)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    target = fp32.with_name(f"{fp32.name.removesuffix('.onnx')}.int8.onnx")
    with staged(target) as tmp:
        if calibration:
            quantize_static(fp32, tmp, _Calibration(calibration, meta), per_channel=True)
        else:
            quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8)
        open_session(tmp, "cpu")  # the checker and a session must accept it
    return target


def val_miou(cfg: Config, models: dict[str, Path], meta: dict) -> dict[str, float]:
    """Single-scale, no-CRF val mIoU of each ONNX file; empty when val has no masks."""
    root = cfg.data.root
    try:
        samples = [s for s in voc.split_samples(root, cfg.data.val_list) if voc.mask_path(root, s.id).is_file()]
    except McisError:
        return {}
    if not samples:
        return {}
    k = len(meta["class_names"])
    result = {}
    for name, path in models.items():
        session, _ = open_session(path, "cpu")
        cm = np.zeros((k, k), np.int64)
        for sample in samples:
            pred = infer(session, transforms.load_image(sample.image)[None], meta)[0]
            cm += metrics.confusion_matrix(pred, voc.load_mask(root, sample.id), k)
        result[f"quant/miou_{name}"] = metrics.scores(cm, meta["class_names"])["miou"]
    return result


def _describe(path: Path) -> str:
    """What an existing file at the output path is, for the 'replaced' message."""
    try:
        return f"the export of segment run {read_metadata(path).get('source_run', '?')}"
    except McisError:
        return "a file that is not an mcis model"


def _memory(cfg: Config) -> tuple[str, str]:
    return f"parity sizes {cfg.export.parity_sizes}", "export.parity_sizes"


STAGE = engine.Stage("export", reads=("segment",), sections=("export",), memory=_memory, one_process=True)


@STAGE
def run(cfg: Config, from_run: str | None = None, out: str | Path | None = None, resume: str | None = None,
        parent: tracking.Nest | None = None, ceiling: bool = False) -> StageResult:
    """Export the segment run's model, verify it, log it and register it in MLflow.

    The fully supervised ceiling is exported only with `ceiling=True`: registered under the
    served name by mistake, it would stand in for the method (its tags say which it is).
    """
    ex = cfg.export
    if ex.precision == "int8" and ex.quantize == "none":
        raise McisError("export.precision=int8 needs export.quantize=dynamic or static "
                        "(how the int8 model is made)")
    job = engine.start(STAGE, cfg, from_run=from_run, resume=resume, parent=parent,
                       extra={"out": str(Path(out).resolve()) if out else None})
    source = job.source
    if source.role == tracking.CEILING and not ceiling:
        raise McisError(f"segment run {source.run_id} is the fully supervised ceiling (trained on "
                        "ground-truth masks), not the method; pass --ceiling to export it on purpose")
    model, meta = artifacts.load_segmenter(source.fetch(artifacts.MODEL))
    calibration = [s.image for s in voc.train_samples(cfg.data)[:CALIBRATION_IMAGES]] \
        if ex.quantize == "static" else []
    with job.open(lock=Path(out) if out else None):
        tracker = job.log  # a one-process stage: this process holds the run
        target = Path(out) if out else job.folder / "model.onnx"
        metadata = model_metadata(meta, source.run_id, ex.opset)
        program = to_onnx(model, ex.opset, metadata)
        previous = _describe(target) if target.exists() else None
        scores = save_checked(program, target, model, cfg, tracker)
        if previous:
            console.print(f"export: replaced {target}, which held {previous}")
        tracker.log_artifact(target, "onnx")
        outputs = {"onnx": str(target)}
        if ex.quantize != "none":
            int8 = quantize(target, meta, calibration)
            tracker.log_artifact(int8, "onnx")
            outputs["int8"] = str(int8)
            quant = val_miou(cfg, {"fp32": target, "int8": int8}, meta)
            quant["quant/size_ratio"] = int8.stat().st_size / target.stat().st_size
            tracker.log_metrics(quant)
            scores.update(quant)
        if ex.precision == "fp16":
            fp16 = target.with_name(f"{target.name.removesuffix('.onnx')}.fp16.onnx")
            scores.update(save_checked(to_onnx(Fp16(model).eval(), ex.opset, metadata), fp16, model,
                                       cfg, tracker, prefix="fp16"))
            tracker.log_artifact(fp16, "onnx")
            outputs["fp16"] = str(fp16)
        if ex.register_model:
            served = Path(outputs["onnx" if ex.precision == "fp32" else ex.precision])
            example = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
            tracking.log_onnx_model(tracker, onnx.load(served), "onnx", example, ex=ex)
            info = tracking.log_serving_model(tracker, served, "model", example_png(), ex.model_name, ex)
            version = str(info.registered_model_version)
            served_config = tracking.serving_config(ex)
            tags = {tracking.SOURCE_TAG: source.run_id, tracking.ROLE_TAG: source.role,
                    tracking.LABELS_TAG: source.tags.get(tracking.LABELS_TAG, "pseudo"),
                    "parity/max_abs_diff": scores["parity/max_abs_diff"],
                    "precision": ex.precision, "serving": ex.serving, "file": served.name,
                    "onnxruntime": json.dumps({k: served_config[k] for k in tracking.ORT_KEYS}),
                    "max_pixels": ex.max_pixels, "max_request_mb": ex.max_request_mb}
            tags.update({k: v for k, v in scores.items() if k.startswith("fp16/")})
            found = source_miou(cfg, source)
            if found:
                tags["miou"], tags["miou_from"] = found
            for key, value in tags.items():
                tracking.set_model_version_tag(tracker, ex.model_name, version, key, value)
            outputs["registered"] = f"models:/{ex.model_name}/{version}"
            if source.role == tracking.METHOD:  # a baseline or the ceiling never stands for the method
                tracking.set_challenger(tracker, ex.model_name, version)
                outputs["challenger"] = f"models:/{ex.model_name}@{tracking.CHALLENGER}"
    return job.result(scores, outputs)

