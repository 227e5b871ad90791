"""Where a run's inputs came from: the source commit and a fingerprint of the dataset.

Kept apart from the tracking package because nothing here needs MLflow: the values are plain
strings that `tracking.stage_run` puts in a new run's tags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """HEAD of the source checkout; in an image built without .git, MCIS_GIT_COMMIT (a build arg)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MCIS_GIT_COMMIT", "unknown")


def dataset_fingerprint(root: str | Path) -> str:
    """Hash of the split and label lists: cheap, and changes whenever the dataset does."""
    lists = Path(root) / "ImageSets" / "Segmentation"
    digest = hashlib.sha256()
    for path in sorted(lists.glob("*.txt")) if lists.is_dir() else []:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
