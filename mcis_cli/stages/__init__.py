"""Pipeline stages. Each module exposes `run(cfg, ...) -> StageResult` and knows nothing of the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> local path
