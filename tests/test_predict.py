"""`mcis predict`: ONNX Runtime inference from the model metadata alone, without PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import predict, serving
from mcis_cli.cli import app
from mcis_cli.data import transforms
from mcis_cli.errors import McisError
from mcis_cli.stages import export
from tests.test_export import CLASSES, spread_model


def blocky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w].astype(np.uint8)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = spread_model()
    meta = {"class_names": CLASSES, "num_classes": len(CLASSES), "arch": "vgg16",
            "mean": list(transforms.IMAGENET_MEAN), "std": list(transforms.IMAGENET_STD)}
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export.to_onnx(model, 18, export.model_metadata(meta, "run0", 18)).save(path, external_data=False)
    return model, path


@pytest.fixture
def images(tmp_path):
    """Two 48x64 images (one batch) and one 40x56 image, as JPEG and PNG files."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (h, w) in {"a.png": (48, 64), "b.jpg": (48, 64), "c.png": (40, 56)}.items():
        Image.fromarray(blocky(rng, h, w)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # folders are filtered by suffix
    return folder


def test_masks_equal_torch_on_training_preprocessing(model_file, images, tmp_path):
    model, path = model_file
    result = predict.predict_files(path, [str(images)], tmp_path / "out", provider="cpu")
    assert str(result).startswith("3 images") and "CPUExecutionProvider" in str(result)
    assert result.written == 3 and not result.failed
    for stem in ("a", "b", "c"):
        source = next(images.glob(f"{stem}.*"))
        image = transforms.load_image(source)
        with torch.no_grad():
            expected = model(transforms.to_tensor(image)[None]).argmax(1)[0].numpy()
        written = Image.open(tmp_path / "out" / f"{stem}.png")
        assert written.mode == "P"
        assert written.getpalette()[:12] == transforms.voc_palette()[:4].ravel().tolist()
        np.testing.assert_array_equal(np.asarray(written), expected)
        assert len(np.unique(expected)) > 1  # the check is not a constant mask
        overlay = Image.open(tmp_path / "out" / f"{stem}_overlay.jpg")
        assert overlay.size == written.size == (image.shape[1], image.shape[0])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_files_and_globs_collected_once(images):
    found = predict.collect_images([str(images / "a.png"), str(images / "*.png"), str(images)])
    assert [p.name for p in found] == ["a.png", "c.png", "b.jpg"]


def test_providers_auto_and_cpu_report_cpu(model_file):
    _, path = model_file
    for provider in ("auto", "cpu"):
        _, used = predict.open_session(path, provider)
        assert used == "CPUExecutionProvider"


def test_cuda_with_the_cpu_package_is_a_clear_error(model_file):
    with pytest.raises(McisError, match="no CUDA support.*--provider cpu"):
        predict.open_session(model_file[1], "cuda")


def test_cuda_listed_without_a_gpu(model_file, monkeypatch):
    """onnxruntime-gpu on a machine without a GPU lists CUDA, then runs on the CPU."""
    monkeypatch.setattr(serving.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(serving.ort, "InferenceSession", _CpuOnlySession)
    with pytest.raises(McisError, match="did not start"):
        predict.open_session(model_file[1], "cuda")
    assert predict.open_session(model_file[1], "auto")[1] == "CPUExecutionProvider"


class _CpuOnlySession:
    def __init__(self, path, providers, provider_options):
        self.providers = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]


CPU, CUDA, TRT = serving.CPU, serving.CUDA, serving.TENSORRT
HEURISTIC = {"cudnn_conv_algo_search": "HEURISTIC"}


def test_provider_list_orders_and_configures_the_providers(tmp_path, monkeypatch):
    """The CUDA path cannot run here; what it is given is decided by `provider_list` alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trt = (TRT, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(tmp_path / "mcis" / "tensorrt")})
    everything = [TRT, CUDA, CPU]
    assert serving.provider_list("auto", {}, everything) == [(CUDA, HEURISTIC), (CPU, {})]  # a bare .onnx file
    assert serving.provider_list("auto", {}, [CPU]) == [(CPU, {})]
    assert serving.provider_list("cpu", {"tensorrt": True}, everything) == [(CPU, {})]
    exhaustive = {"cudnn_conv_algo_search": "EXHAUSTIVE", "tensorrt": True}
    assert serving.provider_list("auto", exhaustive, everything) == \
        [trt, (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}), (CPU, {})]
    assert serving.provider_list("cuda", exhaustive, everything) == [trt, (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"})]
    assert serving.provider_list("auto", exhaustive, [CUDA, CPU])[0][0] == CUDA  # TensorRT not installed
    with pytest.raises(McisError, match="no CUDA support"):
        serving.provider_list("cuda", {}, [CPU])
    with pytest.raises(McisError, match="provider must be auto, cpu or cuda"):
        serving.provider_list("tpu", {}, everything)


class _Recorder(_CpuOnlySession):
    """A session that keeps what it was given (this onnxruntime has no GPU provider to run)."""

    given: list = []
    session = ort.InferenceSession  # the real one, for the model's metadata

    def __init__(self, path, providers, provider_options):
        super().__init__(path, providers, provider_options)
        _Recorder.given.append(list(zip(providers, provider_options, strict=True)))
        self.real = _Recorder.session(path, providers=[CPU])

    def get_modelmeta(self):
        return self.real.get_modelmeta()


def test_settings_reach_the_session_of_predict_and_of_the_served_model(model_file, monkeypatch):
    monkeypatch.setattr(serving.ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(serving.ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(serving.ort, "InferenceSession", _Recorder)
    monkeypatch.setattr(_Recorder, "given", [])
    predict.open_session(model_file[1], "auto", {"cudnn_conv_algo_search": "DEFAULT"})
    config = {"providers": [TRT, CUDA, CPU], "cudnn_conv_algo_search": "HEURISTIC", "tensorrt": True,
              "max_pixels": 100, "max_request_mb": 1}
    serving.Segmenter(model_file[1], config)
    cpu_model = serving.Segmenter(model_file[1], {**config, "providers": [CPU]})
    first, served, served_cpu = _Recorder.given
    assert first == [(CUDA, {"cudnn_conv_algo_search": "DEFAULT"}), (CPU, {})]
    assert [name for name, _ in served] == [TRT, CUDA, CPU] and served[1][1] == HEURISTIC
    assert served[0][1]["trt_engine_cache_enable"] == "True"
    assert served_cpu == [(CPU, {})] and cpu_model.max_pixels == 100


def test_metadata_is_all_a_consumer_needs(model_file):
    meta = predict.read_metadata(model_file[1])
    assert meta["class_names"] == CLASSES and meta["num_classes"] == len(CLASSES)
    assert meta["mean"] == pytest.approx(transforms.IMAGENET_MEAN)
    assert meta["std"] == pytest.approx(transforms.IMAGENET_STD)
    assert (meta["color_order"], meta["layout"], meta["opset"]) == ("RGB", "NCHW", 18)


def test_bad_model_inputs(model_file, tmp_path, images):
    with pytest.raises(McisError, match="model not found"):
        predict.predict_files(tmp_path / "missing.onnx", [str(images)], tmp_path / "out")
    text = tmp_path / "fake.onnx"
    text.write_text("this is not a protobuf")
    with pytest.raises(McisError, match="not a valid ONNX model"):
        predict.predict_files(text, [str(images)], tmp_path / "out")
    bare = onnx.load(model_file[1])
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(McisError, match="lacks the mcis metadata"):
        predict.predict_files(tmp_path / "bare.onnx", [str(images)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_image_inputs(model_file, tmp_path, images):
    path = model_file[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(McisError, match="no images found"):
        predict.predict_files(path, [str(empty)], tmp_path / "out")
    with pytest.raises(McisError, match="no images found"):
        predict.predict_files(path, [str(tmp_path / "nothing-*.jpg")], tmp_path / "out")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    with pytest.raises(McisError, match=r"broken\.jpg: corrupt or unreadable image"):
        predict.predict_files(path, [str(broken)], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing to segment: nothing written
    twin = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(twin)
    with pytest.raises(McisError, match="would both write a.png"):
        predict.predict_files(path, [str(images), str(twin)], tmp_path / "out")


def test_serving_path_never_imports_torch(model_file, images, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from mcis_cli import predict
        print(predict.predict_files({str(model_file[1])!r}, [{str(images)!r}], {str(tmp_path / "out")!r}))
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 images" in done.stdout
    assert (tmp_path / "out" / "c.png").is_file()


def test_one_bad_image_leaves_the_good_ones_segmented(model_file, images, tmp_path):
    broken = tmp_path / "notes.jpg"
    broken.write_text("not a jpeg")
    out = tmp_path / "out"
    args = ["predict", str(images / "a.png"), str(broken), str(images / "c.png"),
            "--model", str(model_file[1]), "--out", str(out), "--provider", "cpu"]
    umask = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.umask(umask)
    assert result.exit_code == 2, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg"]
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}  # not mkstemp's 0600
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notes.jpg" in errors[0] and "corrupt or unreadable" in errors[0]
    assert "2 images" in result.stdout and "1 could not be read" in result.stdout


def test_an_out_folder_that_cannot_exist_is_bad_input(model_file, images):
    result = CliRunner().invoke(app, ["predict", str(images / "a.png"), "--model", str(model_file[1]),
                                      "--out", "/proc/nope"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "/proc/nope" in result.stderr
    assert "Traceback" not in result.output
