"""Registry roles and their audit trail: which version is champion (Production) or challenger (Staging), who moved
it there and why, repairs of what a killed promotion left behind, and rollback to the previous champion.

Stage and alias move together: ``Production`` + ``champion`` for the winner (the previous champion is archived),
``Staging`` + ``challenger`` otherwise. Every promotion and rollback is appended to the registered model's audit
trail (``kd history``).
"""

from __future__ import annotations

import getpass
import json
from contextlib import nullcontext
from datetime import UTC, datetime

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import PipelineError
from pipelines.log import logger
from pipelines.tracking.locks import database_lock, lockable

CHAMPION, CHALLENGER = "champion", "challenger"
STAGE_OF_ALIAS = {CHAMPION: "Production", CHALLENGER: "Staging"}
AUDIT_PREFIX = "audit."


def current_version(client: MlflowClient, name: str, alias: str):
    """The version holding ``alias`` (a ModelVersion), or None when no version holds it."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_role(client: MlflowClient, name: str, version: str, alias: str) -> None:
    """Move stage and alias together: the version leaves its other role, the role's previous holder is archived."""
    for other in STAGE_OF_ALIAS:
        holder = current_version(client, name, other)
        if other != alias and holder is not None and holder.version == version:
            client.delete_registered_model_alias(name, other)
    stage = STAGE_OF_ALIAS[alias]
    # Archive the stage's other versions ourselves: MLflow's archive_existing_versions=True compares the
    # integer version column with a string on PostgreSQL and fails there.
    for other in client.get_latest_versions(name, stages=[stage]):
        if other.version != version:
            client.transition_model_version_stage(name, other.version, "Archived")
    client.transition_model_version_stage(name, version, stage)
    client.set_registered_model_alias(name, alias, version)


def record(client: MlflowClient, name: str, event: str, version: str, previous: str | None, why: str) -> None:
    """Append one entry to the model's audit trail (a registered-model tag per event, ordered by time)."""
    when = datetime.now(UTC)
    entry = {
        "event": event,
        "version": version,
        "previous": previous,
        "who": getpass.getuser(),
        "when": when.isoformat(timespec="seconds"),
        "why": why,
    }
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{when.strftime('%Y%m%dT%H%M%S%f')}", json.dumps(entry))


def history(name: str) -> list[dict]:
    """The model's audit trail, oldest event first."""
    client = MlflowClient()
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        raise PipelineError(f"no registered model {name!r}; promote one first (mlflow run . -e promote)") from None
    return [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(AUDIT_PREFIX))]


def _version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        return None


def _run_status(client: MlflowClient, run_id: str) -> str:
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return "DELETED"


def registry_lock(name: str, storage_url: str | None = None):
    """Serialise promotions and rollbacks of one model: through the tracking database when MLflow talks to
    one directly, else through the study's database (an HTTP tracking server offers no lock)."""
    tracking_uri = mlflow.get_tracking_uri()
    url = tracking_uri if lockable(tracking_uri) else storage_url or ""
    return database_lock(url, f"registry:{name}") if lockable(url) else nullcontext()


def repair_roles(client: MlflowClient, name: str) -> list[str]:
    """Undo what a promotion killed half-way left behind; returns what was repaired.

    The audit trail is the record: a version no event names, whose run has ended (its process died or failed
    after registering it), is deleted; then the champion of record and the challenger hold their stage and
    alias, and nothing else holds those stages. Call under ``registry_lock``.
    """
    try:
        entries = history(name)
    except PipelineError:
        return []
    recorded = {entry["version"] for entry in entries}
    repaired = []
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.version not in recorded and _run_status(client, version.run_id) != "RUNNING":
            client.delete_model_version(name, version.version)
            repaired.append(f"deleted v{version.version}: registered by run {version.run_id}, which ended before recording a role")
    champions = [entry["version"] for entry in entries if entry["event"] in ("promote", "rollback")]
    holders = {CHAMPION: current_version(client, name, CHAMPION), CHALLENGER: current_version(client, name, CHALLENGER)}
    if holders[CHAMPION] is None and champions:
        holders[CHAMPION] = _version(client, name, champions[-1])
    for alias, holder in holders.items():
        if holder is None:
            continue
        stage = STAGE_OF_ALIAS[alias]
        in_stage = {v.version for v in client.get_latest_versions(name, stages=[stage])}
        if in_stage != {holder.version} or alias not in client.get_model_version(name, holder.version).aliases:
            set_role(client, name, holder.version, alias)
            repaired.append(f"v{holder.version} restored as {alias} ({stage})")
    if repaired:
        record(client, name, "repair", holders[CHAMPION].version if holders[CHAMPION] else "-", None, "; ".join(repaired))
        logger("registry").warning(f"repaired {name}: {'; '.join(repaired)}")
    return repaired


def rollback(name: str, reason: str = "manual rollback") -> str:
    """Make the previous champion the champion again (current one archived); returns its version."""
    client = MlflowClient()
    with registry_lock(name):
        repair_roles(client, name)
        current = current_version(client, name, CHAMPION)
        if current is None:
            raise PipelineError(f"{name} has no champion to roll back from")
        previous = next(
            (
                e["previous"]
                for e in reversed(history(name))
                if e["event"] in ("promote", "rollback") and e["version"] == current.version and e["previous"]
            ),
            None,
        )
        if previous is None:
            raise PipelineError(f"{name} v{current.version} has no earlier champion to roll back to")
        set_role(client, name, previous, CHAMPION)
        record(client, name, "rollback", previous, current.version, reason)
    logger("rollback").info(f"{name} champion v{current.version} -> v{previous}")
    return previous
