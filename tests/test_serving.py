"""The registered MLflow model over HTTP, as a team serves it: `mlflow models serve` on
models:/<name>@champion, 127.0.0.1, real images in, the masks `mcis predict` writes out (base64
PNGs, or nested lists on request), bad requests answered 400 and requests beyond the model's
limits 413, with the reason, while the server keeps serving; and the served model's own
environment."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import tomllib
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from mcis_cli import engine, predict, serving, tracking
from mcis_cli.data import voc
from mcis_cli.stages import export
from tests import servers
from tests.photos import photos
from tests.test_export import _config, segment_run, spread_model

REPO = Path(__file__).resolve().parents[1]


MAX_PIXELS, MAX_REQUEST_MB = 1_000_000, 1  # low limits, so that real photos reach them


@pytest.fixture(scope="module")
def registered(store, toy_root):
    """`mcis export` of a segmenter over the embedded dataset's classes, promoted: its
    models:/mcis-deeplab-toy@champion URI and its .onnx file."""
    names = ["background", *voc.class_names(toy_root)]
    cfg = _config(store, f"data.root={toy_root}", "name=serving-test", f"export.max_pixels={MAX_PIXELS}",
                  f"export.max_request_mb={MAX_REQUEST_MB}")
    result = export.run(cfg, from_run=segment_run(cfg, spread_model(names), names, val_miou=0.5))
    tracking.promote("challenger", cfg.export.model_name)
    return f"models:/{cfg.export.model_name}@champion", Path(result.outputs["onnx"])


@pytest.fixture(scope="module")
def server(registered, store):
    """`mlflow models serve` on the registered version (the compose `serve` service's command)."""
    port = servers.free_port()
    log = store / f"models-serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered[0], "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=store, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        servers.wait_http(url + "/ping", proc, log)
        yield url, log
    finally:
        servers.stop_group(proc)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict | str]:
    request = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def decoded(row: dict) -> np.ndarray:
    """The mask of an answer row: its base64 PNG."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask_png"]))))


def images_payload(*encoded: bytes, **params) -> bytes:
    """What a client sends: a column `image` of base64 strings, in MLflow's dataframe_split form."""
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in encoded]}}
    if params:
        payload["params"] = params
    return json.dumps(payload).encode()


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none: Pillow refuses it on opening,
    before decoding, so the test needs no gigabyte image."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_served_masks_equal_predicts(server, registered, toy_root, tmp_path):
    url, log = server
    with urllib.request.urlopen(url + "/ping", timeout=10) as reply:
        assert reply.status == 200
    halves = tmp_path / "halves.png"  # black | white: whatever the data, the random model's mask varies on it
    halves.write_bytes(png(np.repeat(np.repeat(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8), 48, 1), 96, 0)))
    images = [*sorted((toy_root / "JPEGImages").glob("val_*.jpg"))[:2], halves]
    status, body = post(url, images_payload(*(p.read_bytes() for p in images), scores=True))
    assert status == 200, body
    predict.predict_files(registered[0], [str(p) for p in images], tmp_path / "pred", provider="cpu")
    k = len(serving.read_metadata(registered[1])["class_names"])
    for path, row in zip(images, body["predictions"], strict=True):
        expected = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}.png"))
        np.testing.assert_array_equal(decoded(row), expected, err_msg=path.name)
        assert len(row["scores"]) == k and all(0 <= s <= 1 for s in row["scores"])
    assert any(len(np.unique(decoded(r))) > 1 for r in body["predictions"])
    assert "segmenter loaded on CPUExecutionProvider" in log.read_text()


@pytest.mark.slow
def test_a_photo_over_http_compact_by_default_lists_on_request(server, registered, tmp_path):
    """A real photograph and its EXIF-turned copy: masks at the displayed size, equal to
    `mcis predict`'s; the PNG answer is a fraction of the nested lists'."""
    url, _ = server
    pictures = photos(tmp_path)
    china, rotated = pictures["china"][0], pictures["rotated"][0]
    predict.predict_files(registered[0], [str(china), str(rotated)], tmp_path / "pred", provider="cpu")
    answers = {}
    for form in ("png", "lists"):
        request = urllib.request.Request(url + "/invocations", images_payload(china.read_bytes(), format=form),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answers[form] = reply.read()
    png_row = json.loads(answers["png"])["predictions"][0]
    lists_row = json.loads(answers["lists"])["predictions"][0]
    expected = np.asarray(Image.open(tmp_path / "pred" / "china.png"))
    assert expected.shape == pictures["china"][1] == (427, 640)
    np.testing.assert_array_equal(decoded(png_row), expected)
    np.testing.assert_array_equal(np.asarray(lists_row["mask"], np.uint8), expected)
    assert list(png_row) == ["mask_png"] and list(lists_row) == ["mask"]
    assert len(answers["png"]) * 4 < len(answers["lists"]), {k: len(v) for k, v in answers.items()}
    status, body = post(url, images_payload(rotated.read_bytes()))
    assert status == 200, body
    np.testing.assert_array_equal(decoded(body["predictions"][0]),
                                  np.asarray(Image.open(tmp_path / "pred" / "rotated.png")))
    assert decoded(body["predictions"][0]).shape == (427, 640)  # as shown, not as stored (640 x 427)


BAD = {
    "corrupt bytes": (images_payload(b"\xff\xd8\xff\xe0 not really a jpeg"), 400, "image 0: corrupt or unreadable image"),
    "text, not an image": (images_payload(b"hello"), 400, "image 0: corrupt or unreadable image"),
    "1x1 px": (images_payload(png(np.zeros((1, 1, 3), np.uint8))), 400, "image 0: 1x1 px is below the 8 px minimum side"),
    "second image bad": (images_payload(png(np.zeros((16, 16, 3), np.uint8)), b"x"), 400, "image 1: corrupt"),
    "unknown format": (images_payload(png(np.zeros((16, 16, 3), np.uint8)), format="xml"), 400,
                       "params.format must be one of png, lists, got 'xml'"),
    "no image column": (json.dumps({"dataframe_split": {"columns": ["picture"], "data": [["aGk="]]}}).encode(), 400, "image"),
    "no known key": (json.dumps({"images": ["aGk="]}).encode(), 400, "dataframe_split"),
    "not base64": (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["@@@"]]}}).encode(), 400, "image 0"),
    "not JSON": (b"{this is not json", 400, "JSON"),
    # beyond the served model's limits (export.max_pixels, export.max_request_mb), and Pillow's
    "1200x1000 px": (images_payload(png_header(1200, 1000)), 413,
                     f"image 0: 1200x1000 px is beyond the served model's limit of {MAX_PIXELS} pixels (export.max_pixels)"),
    "20000 px": (images_payload(png_header(20000, 20000)), 413, "image 0: image too large for Pillow's decompression-bomb limit"),
    "2 MB": (images_payload(*[b"\x00" * 500_000] * 4), 413,
             f"the request's 4 images hold 2.0 MB, beyond the served model's limit of {MAX_REQUEST_MB} MB"),
}


@pytest.mark.slow
def test_bad_requests_are_4xx_with_the_reason_and_the_server_keeps_serving(server):
    url, log = server
    for name, (body, code, reason) in BAD.items():
        status, reply = post(url, body)
        assert status == code, (name, status, reply)
        assert isinstance(reply, dict) and reason in reply["message"], (name, reply)
        assert "stack_trace" not in reply and "Traceback" not in reply["message"], name
        if reason.startswith("image "):  # the model's own checks: the reason alone, one line
            assert reply["message"].startswith(reason) and "\n" not in reply["message"], reply
    status, reply = post(url, images_payload(png(np.zeros((16, 16, 3), np.uint8))))
    assert status == 200 and decoded(reply["predictions"][0]).shape == (16, 16)


def test_served_model_is_self_contained_and_torch_free(registered, store, tmp_path):
    """The model loads and predicts from its own code_paths (no mcis install needed) and never
    imports torch."""
    model_dir = Path(mlflow.artifacts.download_artifacts(registered[0], dst_path=str(tmp_path)))
    script = textwrap.dedent(f"""
        import json, sys, mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        out = model.predict(pd.DataFrame({{"image": [open({str(tmp_path / 'x.png')!r}, "rb").read()]}}),
                            params={{"format": "lists"}})
        print(out["mask"][0].shape)
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print(json.dumps(sorted({{m.__file__ for n, m in sys.modules.items() if n.startswith("mcis_cli")}})))
    """)
    (tmp_path / "x.png").write_bytes(png(np.full((24, 40, 3), 200, np.uint8)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shape, files = done.stdout.strip().splitlines()[-2:]
    assert shape == "(24, 40)"
    files = json.loads(files)
    assert files and all(f.startswith(str(model_dir / "code" / "mcis_cli")) for f in files), files
    assert (model_dir / "artifacts" / "model.onnx").is_file()


def test_variants_pin_their_onnxruntime_and_list_their_providers(registered, store, tmp_path):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cfg = _config(store, "name=serving-variants")
    for variant in ("cpu", "gpu"):
        settings = cfg.export.model_copy(update={"serving": variant, "tensorrt": variant == "gpu"})
        with engine.stage_run(cfg, "export") as tracker:
            info = tracking.log_serving_model(tracker, registered[1], "model", export.example_png(), None, settings)
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / variant)))
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
        requirements = (folder / "requirements.txt").read_text().split()
        ort_lines = [r for r in requirements if r.startswith("onnxruntime")]
        pinned = extras[variant][0]
        assert len(ort_lines) == 1 and ort_lines[0].replace("[cuda,cudnn]", "") == pinned, requirements
        assert f"mlflow=={mlflow.__version__}" in requirements and "numpy==2.4.6" in requirements
        assert not [r for r in requirements if r.startswith("torch")]
        config = mlmodel["config"]
        assert config["providers"] == (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"] if variant == "gpu"
            else ["CPUExecutionProvider"])
        assert (config["cudnn_conv_algo_search"], config["tensorrt"]) == ("HEURISTIC", variant == "gpu")
        assert (config["max_pixels"], config["max_request_mb"]) == (4096 * 4096, 32.0)
        # `mcis predict` on a registered model runs with the settings the served model has
        assert tracking.download_model(info.model_uri)[1] == config
