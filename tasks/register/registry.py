"""Registry aliases by hand and by gate: promote, roll back, list (used by the register stage and CLI).

Aliases: `champion` (serving), `previous-champion` (the one it replaced, the rollback target) and
`challenger` (registered, not promoted). Every move is recorded as version tags (`gate.*`), so the
registry itself tells who was promoted when and why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # MLflow is imported where it is used (the CLI lists commands without it)
    from mlflow.tracking import MlflowClient

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous-champion", "challenger"
PROMOTED_EVENT = "neo.model.promoted"
"""Prefect event emitted whenever a version becomes champion (flows/cli/notify.py notifies on it)."""


@dataclass
class VersionRow:
    version: str
    aliases: list[str]
    run_id: str | None
    metric: float | None
    decision: str | None


def alias_version(c: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points to, or None (a missing alias raises in MLflow)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _record(c: MlflowClient, name: str, version: str, decision: str, reason: str) -> None:
    c.set_model_version_tag(name, version, "gate.decision", decision)
    c.set_model_version_tag(name, version, "gate.reason", reason)
    c.set_model_version_tag(name, version, "gate.time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


class RegistryError(ValueError):
    """An expected registry failure (no such model or version), in one line."""


def require_version(c: MlflowClient, name: str, version: str | None = None) -> None:
    """Raise RegistryError naming what is missing: the model (with the known ones) or its version."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(f"model {name!r} is not registered here (registered: "
                            f"{', '.join(known) or 'none'})") from None
    if version is None:
        return
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        have = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
        raise RegistryError(f"model {name!r} has no version {version} (versions: "
                            f"{', '.join(map(str, have)) or 'none'})") from None


def promote(c: MlflowClient, name: str, version: str, reason: str = "promoted by hand") -> str | None:
    """Make `version` the champion; the replaced champion becomes previous-champion. Returns it."""
    require_version(c, name, version)
    old = alias_version(c, name, CHAMPION)
    if old == str(version):
        return old
    if old is not None:
        c.set_registered_model_alias(name, PREVIOUS, old)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    if alias_version(c, name, CHALLENGER) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)
    _record(c, name, str(version), "champion", reason)
    announce_promotion(name, str(version), old, reason)
    return old


def announce_promotion(name: str, version: str, previous: str | None, reason: str) -> None:
    """Emit `neo.model.promoted` where a Prefect API is in reach (a server configured, or inside a
    run); never fails the promotion it reports (a lost event is logged, not raised)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.events import emit_event
        from prefect.settings import PREFECT_API_URL

        if not (PREFECT_API_URL.value() or FlowRunContext.get() or TaskRunContext.get()):
            return  # no server: emitting would start an ephemeral Prefect API just for this
        emit_event(PROMOTED_EVENT, resource={"prefect.resource.id": f"neo.model.{name}.{version}",
                                             "prefect.resource.name": f"{name} v{version}",
                                             "neo.model.name": name, "neo.model.version": version},
                   payload={"previous_champion": previous, "reason": reason})
    except Exception as exc:  # noqa: BLE001 - notification is best effort, registration is not
        logging.getLogger(__name__).warning("could not emit %s for %s v%s: %s", PROMOTED_EVENT, name,
                                            version, exc)


def mark_challenger(c: MlflowClient, name: str, version: str, reason: str) -> None:
    c.set_registered_model_alias(name, CHALLENGER, str(version))
    _record(c, name, str(version), "challenger", reason)


def rollback(c: MlflowClient, name: str) -> tuple[str, str]:
    """Give `champion` back to `previous-champion`; returns (demoted, restored)."""
    require_version(c, name)
    current, previous = alias_version(c, name, CHAMPION), alias_version(c, name, PREVIOUS)
    if previous is None:
        raise ValueError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.delete_registered_model_alias(name, PREVIOUS)
    _record(c, name, previous, "champion", f"rollback from version {current}")
    if current is not None:
        _record(c, name, current, "rolled-back", f"replaced by version {previous} in a rollback")
    announce_promotion(name, previous, current, f"rollback from version {current}")
    return current or "", previous


def list_versions(c: MlflowClient, name: str, metric: str = "val_bpb") -> list[VersionRow]:
    """Versions newest first with their aliases (read per alias: SQLite search omits them)."""
    versions = c.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}
    for alias in (CHAMPION, PREVIOUS, CHALLENGER):
        v = alias_version(c, name, alias)
        if v is not None:
            aliases.setdefault(v, []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        value = mv.tags.get(metric)
        rows.append(VersionRow(str(mv.version), aliases.get(str(mv.version), []), mv.run_id,
                               float(value) if value is not None else None, mv.tags.get("gate.decision")))
    return rows
