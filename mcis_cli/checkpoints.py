"""Checkpoint files: written atomically, read as plain weights only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically; a failed write (full disk, ...) is an OSError naming `path`.

    torch.save turns the OSError of a failed write into a RuntimeError of its zip writer; the
    write goes through a Python file so that the OSError, with its errno, is kept as the context.
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)
    except RuntimeError as exc:
        cause = exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load tensors and plain containers only: a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise McisError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise McisError(f"refusing to load {path}: not a plain weights file ({first[:160]})") from None
