"""`mcis export`: one checked ONNX file, parity with PyTorch, metadata, registry, int8, failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import __version__, artifacts, checkpoints, engine, predict, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from mcis_cli.data import transforms, voc
from mcis_cli.errors import McisError
from mcis_cli.models.deeplab import DeepLabLargeFOV
from mcis_cli.stages import export

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "circle", "square", "star"]
SIZES = [[1, 32, 32], [2, 41, 53], [1, 57, 70]]  # batch 2, odd sizes, not multiples of 8


def spread_model(names: list[str] = CLASSES) -> DeepLabLargeFOV:
    """A small LargeFOV whose logits vary over the image (a fresh one predicts one class)."""
    torch.manual_seed(0)
    model = DeepLabLargeFOV(len(names), width=0.125)
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
                conv.bias.normal_(0, 0.1)
    return model.eval()


def _config(store: Path, *sets: str):
    base = [f"output_dir={store / 'runs'}", f"data.root={store / 'no-data'}", "name=export-test",
            f"export.parity_sizes={SIZES}"]
    return load_config(REPO / "configs" / "toy.yaml", base + list(sets))


def segment_run(cfg, model: torch.nn.Module, names: list[str] = CLASSES,
                val_miou: float | None = None) -> str:
    """A finished segment run holding `model` as segment.run writes it."""
    with engine.stage_run(cfg, "segment") as tracker:
        path = engine.workdir(cfg, tracker.run_id) / artifacts.MODEL
        checkpoints.save_checkpoint(path, {
            "state_dict": model.state_dict(), "arch": "vgg16", "num_classes": len(names),
            "width": 0.125, "class_names": names,
            "mean": list(transforms.IMAGENET_MEAN), "std": list(transforms.IMAGENET_STD),
        })
        tracker.log_artifact(path, "checkpoints")
        if val_miou is not None:
            tracker.log_metrics({"val/miou": val_miou})
    return tracker.run_id


@pytest.fixture(scope="module")
def exported(store):
    cfg = _config(store)
    model = spread_model()
    source = segment_run(cfg, model, val_miou=0.42)
    result = export.run(cfg, from_run=source)
    return cfg, model, source, result


def test_export_is_one_checked_file_with_dynamic_axes(exported):
    *_, result = exported
    path = Path(result.outputs["onnx"])
    assert path.name == "model.onnx" and path.parent.name == result.run_id
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .data, no temp
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(path).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert (graph.input[0].name, dims) == ("input", ["batch", 3, "height", "width"])
    assert graph.output[0].name == "logits"


def test_onnxruntime_matches_torch_at_three_sizes(exported):
    _, model, _, result = exported
    session = ort.InferenceSession(result.outputs["onnx"], providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for n, h, w in SIZES:
        x = torch.randn(n, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (n, len(CLASSES), h, w)
        assert np.abs(got - expected).max() < 1e-4
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999
    assert 0 <= result.metrics["parity/max_abs_diff"] <= 1e-3
    assert result.metrics["parity/argmax_agree"] > 0.999
    assert not any(key.startswith("speed/") for key in result.metrics)  # timing is `make bench`'s
    logged = MlflowClient(tracking.tracking_uri()).get_run(result.run_id).data.metrics
    assert logged["parity/max_abs_diff"] == pytest.approx(result.metrics["parity/max_abs_diff"])


def test_metadata_round_trip(exported):
    *_, source, result = exported
    meta = export.read_metadata(result.outputs["onnx"])
    assert meta["class_names"] == CLASSES and meta["num_classes"] == len(CLASSES)
    assert meta["mean"] == pytest.approx(transforms.IMAGENET_MEAN)
    assert meta["std"] == pytest.approx(transforms.IMAGENET_STD)
    assert (meta["color_order"], meta["value_range"]) == ("RGB", "0-1 then (x-mean)/std")
    assert (meta["source_run"], meta["opset"], meta["mcis_version"]) == (source, 18, __version__)


def test_registered_version_is_tagged_and_served(exported, tmp_path):
    *_, source, result = exported
    uri = result.outputs["registered"]
    assert uri == "models:/mcis-deeplab-toy/1"  # toy.yaml's name: never the VOC model's
    assert result.outputs["challenger"] == "models:/mcis-deeplab-toy@challenger"
    assert tracking.registry.aliases(MlflowClient(tracking.tracking_uri()).get_registered_model("mcis-deeplab-toy")) == {"challenger": "1"}
    tags = MlflowClient(tracking.tracking_uri()).get_model_version("mcis-deeplab-toy", "1").tags
    assert tags["miou"] == "0.42" and tags["mcis.source_run"] == source
    assert (tags["mcis.role"], tags["mcis.labels"]) == ("method", "pseudo")
    assert json.loads(tags["onnxruntime"]) == {"providers": ["CPUExecutionProvider"],
                                               "cudnn_conv_algo_search": "HEURISTIC", "tensorrt": False}
    assert (tags["max_pixels"], tags["max_request_mb"]) == (str(4096 * 4096), "32.0")
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (6, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    summary = predict.predict_files(uri, [str(tmp_path / "x.png")], tmp_path / "registry")
    assert str(summary).startswith("1 image ->")
    predict.predict_files(result.outputs["onnx"], [str(tmp_path / "x.png")], tmp_path / "file")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "registry" / "x.png")),
                                  np.asarray(Image.open(tmp_path / "file" / "x.png")))


def test_dynamic_int8_is_a_checked_model_with_the_metadata(exported, tmp_path):
    fp32 = tmp_path / "served.onnx"
    fp32.write_bytes(Path(exported[3].outputs["onnx"]).read_bytes())
    int8 = export.quantize(fp32, predict.read_metadata(fp32), calibration=[])
    assert int8 == tmp_path / "served.int8.onnx"
    assert "DynamicQuantizeLinear" in {node.op_type for node in onnx.load(int8).graph.node}
    session, _ = predict.open_session(int8, "cpu")
    out = session.run(None, {"input": np.zeros((2, 3, 41, 53), np.float32)})[0]
    assert out.shape == (2, len(CLASSES), 41, 53)
    assert predict.read_metadata(int8)["class_names"] == CLASSES


def test_only_the_method_becomes_the_challenger(exported, store):
    """A ceiling export is registered and tagged, but @challenger stays on the method's version."""
    cfg = exported[0]
    source = segment_run(cfg, spread_model(), val_miou=0.9)
    MlflowClient(tracking.tracking_uri()).set_tag(source, tracking.ROLE_TAG, tracking.CEILING)
    MlflowClient(tracking.tracking_uri()).set_tag(source, tracking.LABELS_TAG, "gt")
    before = MlflowClient(tracking.tracking_uri()).get_registered_model("mcis-deeplab-toy").aliases
    result = export.run(cfg, from_run=source, ceiling=True)
    version = result.outputs["registered"].rsplit("/", 1)[1]
    assert MlflowClient(tracking.tracking_uri()).get_model_version("mcis-deeplab-toy", version).tags["mcis.role"] == "ceiling"
    assert "challenger" not in result.outputs
    assert MlflowClient(tracking.tracking_uri()).get_registered_model("mcis-deeplab-toy").aliases == before


def test_unknown_registry_version_is_one_line(store, tmp_path):
    with pytest.raises(McisError, match="not found in the registry"):
        predict.predict_files("models:/mcis-deeplab/99", [str(tmp_path)], tmp_path / "out")


def test_source_miou_prefers_the_latest_evaluate_run(store):
    cfg = _config(store)
    source_id = segment_run(cfg, spread_model(), val_miou=0.3)
    source = tracking.resolve_run(cfg, "segment", source_id)
    assert export.source_miou(cfg, source) == (0.3, f"segment run {source_id} val/miou")
    with engine.stage_run(cfg, "evaluate", source=source) as tracker:
        tracker.log_metrics({"miou": 0.55})
    assert export.source_miou(cfg, source) == (0.55, f"evaluate run {tracker.run_id}")


def test_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), export.staged(target) as tmp:
        tmp.write_bytes(b"half a mod")
        tmp.with_name("model.onnx.data").write_bytes(b"weights")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and target.read_bytes() == b"old"
    with export.staged(target) as tmp:
        tmp.write_bytes(b"new")
        tmp.with_name("model.onnx.data").write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert target.read_bytes() == b"new"


class _Noisy(torch.nn.Module):
    """A graph whose ONNX twin cannot agree: it draws random numbers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + torch.rand_like(logits)


def test_beyond_tolerance_fails_and_writes_nothing(store, tmp_path, monkeypatch):
    cfg = _config(store, "export.tolerance=0.0")
    source = segment_run(cfg, spread_model())
    model, meta = artifacts.load_segmenter(tracking.resolve_run(cfg, "segment", source).fetch(artifacts.MODEL))
    monkeypatch.setattr(artifacts, "load_segmenter", lambda path: (_Noisy(model).eval(), meta))
    out = tmp_path / "served.onnx"
    out.write_bytes(b"the model being served")
    with pytest.raises(McisError, match="disagree.*no model written"):
        export.run(cfg, from_run=source, out=out)
    assert out.read_bytes() == b"the model being served"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.onnx"]
    runs = MlflowClient(tracking.tracking_uri()).search_runs(
        [MlflowClient(tracking.tracking_uri()).get_experiment_by_name("export-test").experiment_id],
        f"tags.`mcis.source_run` = '{source}'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["parity/max_abs_diff"] > 0


@pytest.mark.slow
def test_static_int8_reports_val_miou_and_replacement_is_announced(store, exported, toy_root, tmp_path, capfd):
    names = ["background", *voc.class_names(toy_root)]
    cfg = _config(store, f"data.root={toy_root}", "export.quantize=static", "export.register_model=false")
    source = segment_run(cfg, spread_model(names), names)
    out = tmp_path / "model.onnx"
    out.write_bytes(Path(exported[3].outputs["onnx"]).read_bytes())
    result = export.run(cfg, from_run=source, out=out)
    assert f"which held the export of segment run {exported[2]}" in " ".join(capfd.readouterr().err.split())
    int8 = Path(result.outputs["int8"])
    assert int8.name == "model.int8.onnx" and "registered" not in result.outputs
    assert predict.read_metadata(int8)["class_names"] == names
    assert 0 <= result.metrics["quant/miou_int8"] <= 1 and 0 <= result.metrics["quant/miou_fp32"] <= 1
    assert result.metrics["quant/size_ratio"] < 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]


@pytest.mark.slow
def test_predict_masks_equal_evaluate_masks(toy_root, tmp_path, monkeypatch):
    """evaluate --save (single scale, no flip, no CRF) -> export -> predict, all through the CLI:
    the served masks are the evaluated ones."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    sets = [f"data.root={toy_root}", f"output_dir={tmp_path / 'runs'}", "name=e2e", "device=cpu",
            "evaluate.scales=[1.0]", "evaluate.flip=false", "evaluate.overlays=0",
            "export.parity_sizes=[[1,64,64],[2,33,47]]"]
    cfg = load_config(REPO / "configs" / "toy.yaml", sets)
    names = ["background", *voc.class_names(toy_root)]
    segment_run(cfg, spread_model(names), names)
    args = ["--config", str(REPO / "configs" / "toy.yaml"), *(a for s in sets for a in ("--set", s))]
    runner = CliRunner()
    for command in (["evaluate", "--no-crf", "--save"], ["export"]):
        done = runner.invoke(app, command + args)
        assert done.exit_code == 0, done.output
    masks = tracking.find_runs(cfg, "evaluate")[0].fetch("masks")
    exported = next((tmp_path / "runs").glob("*/model.onnx"))
    done = runner.invoke(app, ["predict", "--model", str(exported), "--out", str(tmp_path / "pred"),
                               str(toy_root / "JPEGImages" / "val_*.jpg")])
    assert done.exit_code == 0, done.output
    expected = sorted(masks.glob("*.png"))
    assert len(expected) == len(voc.split_samples(toy_root, "val"))
    assert any(len(np.unique(np.asarray(Image.open(path)))) > 1 for path in expected)
    for path in expected:
        served = np.asarray(Image.open(tmp_path / "pred" / path.name))
        np.testing.assert_array_equal(served, np.asarray(Image.open(path)), err_msg=path.name)


def test_fp16_export_is_checked_against_torch_and_registered_as_fp16(store):
    cfg = _config(store, "name=export-fp16", "export.precision=fp16")
    model = spread_model()
    result = export.run(cfg, from_run=segment_run(cfg, model))
    fp16 = Path(result.outputs["fp16"])
    assert fp16.name == "model.fp16.onnx" and fp16.parent == Path(result.outputs["onnx"]).parent
    graph = onnx.load(fp16).graph
    types = {t.name: t.type.tensor_type.elem_type for t in [*graph.input, *graph.output]}
    assert types == {"input": onnx.TensorProto.FLOAT, "logits": onnx.TensorProto.FLOAT}  # fp32 boundary
    assert onnx.TensorProto.FLOAT16 in {init.data_type for init in graph.initializer}
    session, _ = predict.open_session(fp16, "cpu")
    x = torch.randn(2, 3, 41, 53, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert 0 < relative <= cfg.export.fp16_tolerance  # not fp32 in disguise, and within the bound
    assert 0 < result.metrics["fp16/max_rel_diff"] <= cfg.export.fp16_tolerance
    assert result.metrics["fp16/argmax_agree"] > 0.98
    version = result.outputs["registered"].rsplit("/", 1)[1]
    tags = MlflowClient(tracking.tracking_uri()).get_model_version("mcis-deeplab-toy", version).tags
    assert (tags["precision"], tags["file"], tags["serving"]) == ("fp16", "model.fp16.onnx", "cpu")
    assert float(tags["fp16/max_rel_diff"]) == pytest.approx(result.metrics["fp16/max_rel_diff"])


def test_fp16_beyond_tolerance_fails_and_int8_needs_a_quantizer(store):
    cfg = _config(store, "name=export-fp16-tight", "export.precision=fp16", "export.fp16_tolerance=1e-9")
    before = set((store / "runs").glob("*/model.fp16.onnx"))
    with pytest.raises(McisError, match=r"model\.fp16\.onnx\) and PyTorch disagree: max_rel_diff.*export\.fp16_tolerance.*no model written"):
        export.run(cfg, from_run=segment_run(cfg, spread_model()))
    assert set((store / "runs").glob("*/model.fp16.onnx")) == before
    with pytest.raises(McisError, match="precision=int8 needs export.quantize"):
        export.run(_config(store, "export.precision=int8"))
