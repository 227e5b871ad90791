"""Shared fixtures. `toy_root`: a small embedded dataset written once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcis_cli.data import synth

ROOT = Path(__file__).resolve().parents[1]


def _user_store() -> tuple[set[Path], float | None]:
    """What the checkout's own store holds: ./mlruns down to the run folders, ./mlflow.db's mtime."""
    runs = {p for pattern in ("*", "*/*") for p in (ROOT / "mlruns").glob(pattern)}
    db = ROOT / "mlflow.db"
    return runs, db.stat().st_mtime if db.exists() else None


@pytest.fixture(scope="session", autouse=True)
def user_store_untouched() -> Iterator[None]:
    """Tests track to temporary stores only: the session fails if it wrote into the checkout's."""
    before = _user_store()
    yield
    after = _user_store()
    assert after[0] <= before[0], f"tests wrote into {ROOT / 'mlruns'}: {sorted(after[0] - before[0])}"
    assert after[1] == before[1], f"tests wrote into {ROOT / 'mlflow.db'}"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC-layout synth tree (48 train, 16 val, 8 extra, 8 web images of 64 px); read-only."""
    root = tmp_path_factory.mktemp("toy") / "voc"
    synth.write(root, seed=0, n_train=48, n_val=16, size=64, n_extra=8, n_web=8)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tracking database per test module, in a temp folder that is also the working directory
    (creating a database costs seconds); tests in a module differ by experiment name."""
    tmp = tmp_path_factory.mktemp("store")
    umask = os.umask(0o022)  # the usual one, under which every written file must be readable by others
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
            patch.chdir(tmp)
            yield tmp
    finally:
        os.umask(umask)
