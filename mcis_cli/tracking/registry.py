"""The registry's two aliases of a model name: what serving follows, and what may replace it.

`mcis export` registers each version of the method and points `@challenger` at it; serving
(`mlflow models serve -m models:/<name>@champion`, `mcis predict`, the compose `serve` service)
follows `@champion`, which only `mcis promote` moves, after checking what the version is (its
`mcis.role`: a baseline, the ceiling or an ablation variant is not the method) and how well it
segments (its `miou` tag against the champion's). Never `latest`: every export would go live.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcis_cli.errors import McisError
from mcis_cli.tracking.store import METHOD, ROLE_TAG, client, require_store, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
MIOU_TAG = "miou"


def set_challenger(tracker, name: str, version: str) -> None:
    """Point `name@challenger` at `version`: the newest export of the method, not yet serving."""
    tracker.client.set_registered_model_alias(name, CHALLENGER, version)


@dataclass
class Promotion:
    """What `promote` did: `name@champion` now points at `version`; `previous` is the version
    it pointed at before (None for the first champion)."""

    name: str
    version: str
    miou: float | None
    previous: str | None
    previous_miou: float | None

    def __str__(self) -> str:
        if self.previous == self.version:
            return f"version {self.version} already is {self.name}@{CHAMPION}; nothing changed"
        line = f"{self.name}@{CHAMPION} -> version {self.version} (miou {_show(self.miou)})"
        if self.previous is None:
            return line + "; the first champion"
        return (f"{line}; it was version {self.previous} (miou {_show(self.previous_miou)}); roll back "
                f"with `mcis promote {self.previous} --name {self.name} --force`")


def _show(miou: float | None) -> str:
    return "none" if miou is None else f"{miou:.4f}"


def _miou(version) -> float | None:
    value = version.tags.get(MIOU_TAG)
    return None if value is None else float(value)


def aliases(model) -> dict[str, str]:
    """alias -> version of a registered model (a sqlite store gives the versions as numbers)."""
    return {alias: str(number) for alias, number in model.aliases.items()}


def _absent(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _registered(mlc, name: str):
    """The registered model `name`, or a one-line error that lists the names there are."""
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_registered_model(name)
    except MlflowException as exc:
        if not _absent(exc):
            raise
    names = sorted(m.name for m in mlc.search_registered_models())
    raise McisError(f"no registered model {name!r} at {tracking_uri()} (there are: "
                    f"{', '.join(names) or 'none'}); pass --name, or register one with `mcis export`")


def _version(mlc, model, version: str):
    """Version `version` of `model`: a number, or an alias such as `challenger`."""
    from mlflow.exceptions import MlflowException

    number = version if version.isdigit() else aliases(model).get(version)
    if number is None:
        raise McisError(f"{model.name} has no version or alias {version!r} (aliases: "
                        f"{', '.join(f'@{a}' for a in sorted(model.aliases)) or 'none'}); pass a version number")
    try:
        return mlc.get_model_version(model.name, number)
    except MlflowException as exc:
        if not _absent(exc):
            raise
    raise McisError(f"{model.name} has no version {number} at {tracking_uri()}; `mcis ui` lists its versions")


def promote(version: str, name: str, allow_baseline: bool = False, force: bool = False) -> Promotion:
    """Point `name@champion` at `version` (a number or an alias) once it passes the checks.

    Refused, each in one line naming the way past it: a version that is not the method's
    (`mcis.role` baseline, ceiling or ablation, or none) unless `allow_baseline`; one with no
    `miou` tag, or one whose miou is below the champion's, unless `force`.
    """
    require_store(None, f"model {name} not found")
    mlc = client()
    model = _registered(mlc, name)
    candidate = _version(mlc, model, version)
    number, role, miou = str(candidate.version), candidate.tags.get(ROLE_TAG), _miou(candidate)
    where = f"version {number} of {name}"
    if role != METHOD and not allow_baseline:
        what = (f"is a {role} model (mcis.role), not the method" if role
                else "has no mcis.role tag (not registered by `mcis export`)")
        raise McisError(f"{where} {what}; pass --allow-baseline to serve it on purpose")
    previous = aliases(model).get(CHAMPION)
    champion = mlc.get_model_version(name, previous) if previous else None
    previous_miou = _miou(champion) if champion else None
    if not force and previous != number:
        if miou is None:
            raise McisError(f"{where} has no miou tag (its segment run was never scored: run `mcis evaluate` "
                            "on it and export again); pass --force to promote it unscored")
        if previous_miou is not None and miou < previous_miou:
            raise McisError(f"{where} has miou {miou:.4f}, below the champion's (version {previous}: "
                            f"{previous_miou:.4f}); pass --force to promote it anyway")
    if previous != number:
        mlc.set_registered_model_alias(name, CHAMPION, number)
    return Promotion(name, number, miou, previous, previous_miou)
