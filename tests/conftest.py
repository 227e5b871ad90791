"""Shared fixtures. `toy_root`: a small embedded dataset written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcis_cli.data import synth


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC-layout synth tree (48 train, 16 val, 8 extra, 8 web images of 64 px); read-only."""
    root = tmp_path_factory.mktemp("toy") / "voc"
    synth.write(root, seed=0, n_train=48, n_val=16, size=64, n_extra=8, n_web=8)
    return root
