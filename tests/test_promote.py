"""`mcis promote`: the checks before `@champion` moves (the version's role, its miou against the
champion's), one-line refusals with exit code 2, versions named by number or alias, and
`mcis predict --model models:/NAME@champion`; on a sqlite store and on a real tracking server."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from mcis_cli import engine, tracking
from mcis_cli.cli import app
from mcis_cli.config import load_config
from tests import servers
from tests.test_deploy import segmenter

mlflow_server = servers.mlflow_server  # module-scoped fixtures
sqlite_template = servers.sqlite_template
REPO = Path(__file__).resolve().parents[1]
NAME = "mcis-deeplab-test"
VERSIONS = {"1": ("method", 0.5), "2": ("ceiling", 0.9), "3": ("method", 0.4), "4": ("method", None),
            "5": (None, 0.95)}  # version: (mcis.role, miou); 5 was registered by hand


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def registry(request, tmp_path, monkeypatch, sqlite_template) -> MlflowClient:
    """NAME with the VERSIONS, all of one small ONNX model, in a fresh sqlite store or on the
    module's tracking server; the commands track to it."""
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server").uri
    else:
        shutil.copy(sqlite_template, tmp_path / "mlflow.db")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "toy.yaml", [f"output_dir={tmp_path / 'runs'}", f"name=promote-{tmp_path.name}"])
    with engine.stage_run(cfg, "export") as tracker:
        info = tracking.log_onnx_model(tracker, segmenter(["background", "thing"]), "model",
                                       np.zeros((1, 3, 16, 16), np.float32), NAME)
    mlc = MlflowClient(uri)
    with tracking.fluent(uri):
        for _ in range(len(VERSIONS) - 1):
            mlflow.register_model(info.model_uri, NAME)
    for version, (role, miou) in VERSIONS.items():
        for key, value in (("mcis.role", role), ("miou", miou)):
            if value is not None:
                mlc.set_model_version_tag(NAME, version, key, str(value))
    return mlc


def promote(*args: str):
    return CliRunner().invoke(app, ["promote", *args])


def champion(mlc: MlflowClient) -> str | None:
    return tracking.registry.aliases(mlc.get_registered_model(NAME)).get("champion")


def refused(result, *words: str) -> None:
    """Exit code 2 and one line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error:") and "\n" not in line and "Traceback" not in result.output, result.output
    for word in words:
        assert word in line, (word, line)


def test_promote_checks_the_role_and_the_miou_then_moves_the_champion(registry, tmp_path):
    mlc = registry
    first = promote("1", "--name", NAME)
    assert first.exit_code == 0, first.output
    assert f"{NAME}@champion -> version 1 (miou 0.5000); the first champion" in first.stdout
    refused(promote("2", "--name", NAME), "version 2 of mcis-deeplab-test is a ceiling model", "--allow-baseline")
    refused(promote("5", "--name", NAME), "has no mcis.role tag", "--allow-baseline")
    refused(promote("4", "--name", NAME), "version 4 of mcis-deeplab-test has no miou tag", "--force")
    refused(promote("3", "--name", NAME), "miou 0.4000, below the champion's (version 1: 0.5000)", "--force")
    assert champion(mlc) == "1"  # nothing refused moved it

    ceiling = promote("2", "--name", NAME, "--allow-baseline")  # on purpose, and it scores higher
    assert ceiling.exit_code == 0 and champion(mlc) == "2", ceiling.output
    refused(promote("3", "--name", NAME, "--allow-baseline"), "below the champion's (version 2: 0.9000)")
    forced = promote("3", "--name", NAME, "--force")
    assert forced.exit_code == 0 and champion(mlc) == "3", forced.output
    assert f"it was version 2 (miou 0.9000); roll back with `mcis promote 2 --name {NAME} --force`" in forced.stdout

    mlc.set_registered_model_alias(NAME, "challenger", "1")
    by_alias = promote("challenger", "--name", NAME)  # 0.5 > 0.4
    assert by_alias.exit_code == 0 and champion(mlc) == "1", by_alias.output
    again = promote("1", "--name", NAME)
    assert again.exit_code == 0 and "version 1 already is mcis-deeplab-test@champion" in again.stdout

    refused(promote("9", "--name", NAME), "mcis-deeplab-test has no version 9")
    refused(promote("newest", "--name", NAME), "no version or alias 'newest'", "@challenger, @champion")
    refused(promote("1", "--name", "nope"), "no registered model 'nope'", f"there are: {NAME}")
    refused(promote("1"), "no registered model 'mcis-deeplab'")  # the default name: none registered here

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)).save(image)
    done = CliRunner().invoke(app, ["predict", "--model", f"models:/{NAME}@champion", str(image),
                                    "--out", str(tmp_path / "out"), "--provider", "cpu"])
    assert done.exit_code == 0, done.output
    assert np.asarray(Image.open(tmp_path / "out" / "photo.png")).shape == (24, 40)
    refused(CliRunner().invoke(app, ["predict", "--model", "models:/nope@champion", str(image)]),
            "model models:/nope@champion not found in the registry")
