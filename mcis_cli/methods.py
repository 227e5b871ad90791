"""The methods `mcis pipeline --methods` compares: how each one makes its localization maps.

A method is the chain of stages from the images to a run of maps (a run of one of
`artifacts.MAP_STAGES`); from the maps on, every method takes the same steps: `pseudolabel` with
the method's own thresholds (`pseudolabel.for_method`), `segment` with the one recipe, `evaluate`.
A chain names its steps `<method>/<stage>`; a step two chains share (OAA+ needs OAA's run) has one
name, so the pipeline runs it once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mcis_cli.config import Config
from mcis_cli.errors import McisError

if TYPE_CHECKING:
    from mcis_cli.pipeline import Steps
    from mcis_cli.stages import StageResult

MapsChain = Callable[[Config, "Steps"], "StageResult"]


def cam_config(cfg: Config) -> Config:
    """Plain CAM: the same classifier trained and read without co-attention."""
    return cfg.replace(classify={"method": "cam"}, localize={"method": "cam"})


def _classifier_maps(name: str, cfg: Config, step: Steps) -> StageResult:
    from mcis_cli.stages import classify, localize

    trained = step(f"{name}/classify", lambda p: classify.run(cfg, parent=p))
    return step(f"{name}/localize", lambda p: localize.run(cfg, from_run=trained.run_id, parent=p))


def cam(cfg: Config, step: Steps) -> StageResult:
    return _classifier_maps("cam", cam_config(cfg), step)


def mcis(cfg: Config, step: Steps) -> StageResult:
    return _classifier_maps("mcis", cfg, step)


def oaa(cfg: Config, step: Steps) -> StageResult:
    """OAA: the cumulative attention maps of its classifier's training."""
    from mcis_cli.stages import accumulate

    return step("oaa/accumulate", lambda p: accumulate.run(cfg, parent=p))


def oaa_plus(cfg: Config, step: Steps) -> StageResult:
    """OAA+: the integral attention model trained on OAA's cumulative maps (OAA's step, shared)."""
    from mcis_cli.stages import integral

    accumulated = oaa(cfg, step)
    return step("oaa+/integral", lambda p: integral.run(cfg, from_run=accumulated.run_id, parent=p))


# ---- PSA: its classifier's CAMs, AffinityNet, the random walk; the walk on MCIS's maps --------
def _psa_affinity(cfg: Config, step: Steps) -> tuple[StageResult, StageResult]:
    """PSA's CAMs and the AffinityNet trained on them (one step each, whichever chain asks)."""
    from mcis_cli.stages import affinity, psa_cam, psa_classify

    trained = step("psa/psa_classify", lambda p: psa_classify.run(cfg, parent=p))
    cams = step("psa/psa_cam", lambda p: psa_cam.run(cfg, from_run=trained.run_id, parent=p))
    return cams, step("psa/affinity", lambda p: affinity.run(cfg, from_run=cams.run_id, parent=p))


def psa(cfg: Config, step: Steps) -> StageResult:
    from mcis_cli.stages import refine

    cams, aff = _psa_affinity(cfg, step)
    return step("psa/refine", lambda p: refine.run(cfg, from_run=cams.run_id, affinity_run=aff.run_id, parent=p))


def mcis_rw(cfg: Config, step: Steps) -> StageResult:
    """MCIS's maps (its own steps) walked with PSA's AffinityNet."""
    from mcis_cli.stages import refine

    maps = mcis(cfg, step)
    _, aff = _psa_affinity(cfg, step)
    return step("mcis+rw/refine", lambda p: refine.run(cfg, from_run=maps.run_id, affinity_run=aff.run_id, parent=p))


METHODS: dict[str, MapsChain] = {"cam": cam, "oaa": oaa, "oaa+": oaa_plus, "psa": psa, "mcis": mcis,
                                  "mcis+rw": mcis_rw}


def metric_prefix(name: str) -> str:
    """A method's name as MLflow takes it in a metric key, which allows no `+`: oaa+ -> oaa_plus."""
    return name.replace("+", "_plus_").strip("_")


def check(names: list[str]) -> list[str]:
    """`names` if every one is a method, each once; else one line naming the first that is not."""
    for name in names:
        if name not in METHODS:
            raise McisError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise McisError(f"--methods {','.join(names)} names a method twice")
    return names


def parse(text: str) -> list[str]:
    """`--methods cam,mcis` as a checked list."""
    return check([part.strip() for part in text.split(",") if part.strip()])
