"""Untrusted inputs: nothing read from a config, a list file or a model file escapes or executes.

Every case goes through the real command line (or the reader the commands call) and must end in
one `error:` line naming the input and what to do, with a non-zero exit and no traceback.
`BAD_INPUTS` counts them for the issue's figures (each parametrized case is one bad input).
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import engine, predict
from mcis_cli.cli import app
from mcis_cli.config import Config
from mcis_cli.data import synth, transforms, voc
from mcis_cli.errors import McisError
from tests.reliability import procs


def one_line(result, *needles: str, code: int | None = None) -> None:
    """A CliRunner result that failed with one error line holding every needle."""
    assert result.exit_code == code if code is not None else result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines()  # less the stage's note of its input run
             if line.strip() and not line.startswith("input: ")]
    assert lines and lines[0].startswith("error:"), result.output
    flat = " ".join(result.output.split())
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {result.output!r}"


@pytest.fixture
def root(tmp_path) -> Path:
    """A small writable synth tree (the shared toy tree is read-only)."""
    path = tmp_path / "voc"
    synth.write(path, seed=0, n_train=6, n_val=2, size=32)
    return path


# ---- configs: list names and folders stay inside data.root ------------------------------------
ESCAPING_KEYS = [
    ("data.train_list", "../../../etc/passwd"),
    ("data.train_list", "/etc/passwd"),
    ("data.val_list", "../val"),
    ("data.val_list", "sub/val"),
    ("data.extra_lists", "['../../outside']"),
    ("data.extra_lists", "['..']"),
    ("data.saliency_dir", "/etc"),
    ("data.saliency_dir", "../saliency"),
    ("data.saliency_dir", "saliency/../../x"),
]


@pytest.mark.parametrize(("key", "value"), ESCAPING_KEYS)
def test_config_paths_cannot_leave_the_data_root(key, value, tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--set", f"{key}={value}"])
    one_line(result, key, code=2)
    # the same value from a YAML file is refused as well, naming the file
    tree = Config().model_dump(mode="json")
    section, leaf = key.split(".")
    tree[section][leaf] = yaml.safe_load(value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
    one_line(result, key, str(path), code=2)


# ---- list files: ids, paths and symlinks ------------------------------------------------------
def _set_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


@pytest.mark.parametrize(("list_name", "line", "needle"), [
    ("train_aug", "../../../etc/passwd", "unsafe image id"),
    ("train_aug", "/etc/passwd", "unsafe image id"),
    ("train_cls", "../x 1", "unsafe image id"),
    ("extra", "/etc/hostname 1", "absolute path"),
    ("extra", "../../outside.jpg 1", "resolves outside"),
])
def test_list_entries_cannot_leave_the_root(root, tmp_path, list_name, line, needle):
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    (root / voc.LISTS / "extra.txt").touch()
    _set_line(root / voc.LISTS / f"{list_name}.txt", line)
    with pytest.raises(McisError, match=needle):
        voc.train_samples(Config(data={"root": str(root), "extra_lists": ["extra"]}).data)
    report = voc.check(root)
    assert any(needle in problem for problem in report.problems)


def _outside(tmp_path: Path, name: str, content: bytes = b"secret\n") -> Path:
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(content)
    return target


@pytest.mark.parametrize("what", ["list file", "labels file", "lists folder", "image", "mask",
                                  "saliency map"])
def test_symlinks_out_of_the_root_are_refused(root, tmp_path, what):
    lists = root / voc.LISTS
    first = lists.joinpath("train_aug.txt").read_text().split()[0]
    if what == "list file":
        target = _outside(tmp_path, "train_aug.txt", lists.joinpath("train_aug.txt").read_bytes())
        lists.joinpath("train_aug.txt").unlink()
        lists.joinpath("train_aug.txt").symlink_to(target)
    elif what == "labels file":
        target = _outside(tmp_path, "train_cls.txt", lists.joinpath("train_cls.txt").read_bytes())
        lists.joinpath("train_cls.txt").unlink()
        lists.joinpath("train_cls.txt").symlink_to(target)
    elif what == "lists folder":
        moved = tmp_path / "elsewhere" / "Segmentation"
        moved.parent.mkdir(exist_ok=True)
        lists.rename(moved)
        lists.symlink_to(moved, target_is_directory=True)
    elif what == "image":
        image = root / voc.IMAGES / f"{first}.jpg"
        target = _outside(tmp_path, "x.jpg", image.read_bytes())
        image.unlink()
        image.symlink_to(target)
    elif what == "mask":
        mask = root / voc.MASKS / f"{first}.png"
        target = _outside(tmp_path, "x.png", mask.read_bytes())
        mask.unlink()
        mask.symlink_to(target)
        with pytest.raises(McisError, match="resolves outside"):
            voc.load_mask(root, first)
    else:
        (root / "saliency").mkdir()
        (root / "saliency" / f"{first}.png").symlink_to(_outside(tmp_path, "s.png"))
        with pytest.raises(McisError, match="resolves outside"):
            voc.saliency_path(root, "saliency", first)
        return
    if what != "mask":
        with pytest.raises(McisError, match="resolves outside"):
            voc.train_samples(Config(data={"root": str(root)}).data)
    result = CliRunner().invoke(app, ["data", "check", "--root", str(root)])
    assert result.exit_code == 1 and "resolves outside" in result.output, result.output


# ---- images: decompression bombs are refused before decoding ------------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares `width` x `height` gray pixels: the bomb's header, no pixel data
    beyond one compressed row (Pillow refuses it at open, before allocating anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    body += chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return path


BOMBS = [(30_000, 30_000), (12_000, 8_000)]  # 900 Mpx: an error in Pillow; 96 Mpx: a warning


@pytest.mark.parametrize(("width", "height"), BOMBS)
def test_decompression_bombs_are_refused(tmp_path, width, height, onnx_model):
    bomb = png_header_only(tmp_path / "bomb.png", width, height)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(McisError, match="decompression-bomb limit"):
        transforms.load_image(bomb)
    with pytest.raises(McisError, match="decompression-bomb limit"):
        transforms.probe_image(bomb)
    result = CliRunner().invoke(app, ["predict", str(bomb), "--model", str(onnx_model),
                                      "--out", str(tmp_path / "out")])
    one_line(result, "bomb.png", "decompression-bomb limit", code=2)
    assert not (tmp_path / "out").exists()


def test_a_bomb_in_the_dataset_is_reported_by_data_check(root):
    first = (root / voc.LISTS / "train_aug.txt").read_text().split()[0]
    png_header_only(root / voc.IMAGES / f"{first}.jpg", 30_000, 30_000)  # the suffix does not matter
    result = CliRunner().invoke(app, ["data", "check", "--root", str(root)])
    assert result.exit_code == 1
    assert "decompression-bomb limit" in " ".join(result.output.split())


# ---- ONNX files are checked before use ----------------------------------------------------------
def _mcis_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    for key, value in {"class_names": '["background", "thing"]', "num_classes": "2",
                       "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]"}.items():
        model.metadata_props.add(key=key, value=value)
    return model


def tiny_model() -> onnx.ModelProto:
    """A valid 1x1-conv segmenter (2 classes) with the metadata `mcis export` writes."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.linspace(-1, 1, 6).tolist())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return _mcis_metadata(model)


@pytest.fixture
def onnx_model(tmp_path) -> Path:
    path = tmp_path / "good.onnx"
    onnx.save(tiny_model(), path)
    return path


def _bad_models(tmp_path: Path, good: Path) -> dict[str, Path]:
    bad = {}
    bad["garbage"] = tmp_path / "garbage.onnx"
    bad["garbage"].write_bytes(os.urandom(4096))
    bad["truncated"] = tmp_path / "truncated.onnx"
    bad["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    broken = tiny_model()
    broken.graph.node[0].input[0] = "nowhere"  # reads a tensor that nothing produces
    bad["dangling input"] = tmp_path / "dangling.onnx"
    onnx.save(broken, bad["dangling input"])
    outside = tiny_model()
    tensor = outside.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../../../etc/passwd")
    bad["external data out of its folder"] = tmp_path / "traversal.onnx"
    onnx.save(outside, bad["external data out of its folder"])
    unknown = tiny_model()
    unknown.graph.node[0].op_type = "NoSuchOp"
    bad["unknown operator"] = tmp_path / "unknown.onnx"
    onnx.save(unknown, bad["unknown operator"])
    bare = tiny_model()
    del bare.metadata_props[:]
    bad["no mcis metadata"] = tmp_path / "bare.onnx"
    onnx.save(bare, bad["no mcis metadata"])
    bad["not a file"] = tmp_path / "missing.onnx"
    return bad


BAD_MODELS = ["garbage", "truncated", "dangling input", "external data out of its folder",
              "unknown operator", "no mcis metadata", "not a file"]


@pytest.mark.parametrize("case", BAD_MODELS)
def test_onnx_files_are_checked_before_use(tmp_path, onnx_model, case):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    good = CliRunner().invoke(app, ["predict", str(image), "--model", str(onnx_model),
                                    "--out", str(tmp_path / "ok"), "--provider", "cpu"])
    assert good.exit_code == 0, good.output
    path = _bad_models(tmp_path, onnx_model)[case]
    result = CliRunner().invoke(app, ["predict", str(image), "--model", str(path),
                                      "--out", str(tmp_path / "out"), "--provider", "cpu"])
    one_line(result, path.name, code=2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(McisError):
        predict.open_session(path, "cpu")
        predict.read_metadata(path)


# ---- checkpoints from a run's artifacts: a pickle that runs code is refused ---------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("stage", "command", "artifact"), [
    ("classify", "localize", "checkpoints/model.pt"),
    ("segment", "export", "checkpoints/model.pt"),
    ("segment", "evaluate", "checkpoints/model.pt"),
])
def test_a_code_running_checkpoint_in_the_store_is_refused(store, toy_root, tmp_path, stage, command,
                                                           artifact):
    marker = tmp_path / "pwned"
    cfg = Config(name=f"evil-{command}", output_dir=str(tmp_path / "runs"), data={"root": str(toy_root)})
    with engine.stage_run(cfg, stage) as tracker:
        path = tmp_path / Path(artifact).name
        torch.save({"state_dict": _RunsCode(marker), "arch": "vgg16"}, path)
        tracker.log_artifact(path, str(Path(artifact).parent))
    config = procs.write_config(tmp_path / "c.yaml", name=cfg.name, output_dir=cfg.output_dir,
                                device="cpu", **{"data.root": str(toy_root)})
    result = CliRunner().invoke(app, [command, "--config", str(config), "--from-run", tracker.run_id])
    one_line(result, "refusing to load", "model.pt", "not a plain weights file", code=2)
    assert not marker.exists(), "the pickle ran code"


def test_pickle_protocols_and_reducers_are_all_refused(tmp_path):
    """Every pickle protocol, and a payload nested deep in an otherwise plain checkpoint."""
    from mcis_cli.checkpoints import load_checkpoint

    marker = tmp_path / "pwned"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pt"
        state = {"state_dict": {"w": torch.zeros(2)}, "meta": [1, {"deep": _RunsCode(marker)}]}
        with open(path, "wb") as handle:
            torch.save(state, handle, pickle_protocol=protocol)
        with pytest.raises(McisError, match="not a plain weights file"):
            load_checkpoint(path)
    assert not marker.exists()

