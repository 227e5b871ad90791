"""Ratio benchmarks (`make bench`): each bench_*.py module's main() measures and prints a table."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path
from unittest import mock


@contextmanager
def scratch_store() -> Iterator[Path]:
    """A temporary folder holding the benchmark's MLflow store and its artifacts, also the working
    directory: a sqlite store puts artifacts in ./mlruns of where it is first opened, which must
    not be the user's (the project's ./mlruns holds the real experiments)."""
    with tempfile.TemporaryDirectory(prefix="mcis-bench-") as tmp, chdir(tmp), mock.patch.dict(
        os.environ, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    ):
        yield Path(tmp)
