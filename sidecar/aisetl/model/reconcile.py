"""What a target must do to make its transformers match the declarations.

``plan(desired, actual)`` is pure: given the declarations (by ETL ID, with a
fingerprint of their content) and the transformers this target runs (by ETL
ID, with the fingerprint they were started from), it returns the actions. A
declaration whose content changed under the same ID (a GitOps edit) is a stop
followed by a start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

INITIALIZING = "Initializing"
READY = "Ready"
FAILED = "Failed"
STATES = (INITIALIZING, READY, FAILED)


@dataclass(frozen=True)
class Action:
    kind: str  # "start" | "stop"
    etl_id: str


def fingerprint(doc: dict[str, Any]) -> str:
    """A digest of a declaration's data: changes when what to run changes."""
    data = doc.get("data") or {}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def plan(desired: dict[str, str], actual: dict[str, str]) -> list[Action]:
    """Actions turning ``actual`` into ``desired`` (both: ETL ID -> fingerprint)."""
    actions: list[Action] = []
    for etl_id in sorted(actual):
        if desired.get(etl_id) != actual[etl_id]:
            actions.append(Action("stop", etl_id))
    for etl_id in sorted(desired):
        if actual.get(etl_id) != desired[etl_id]:
            actions.append(Action("start", etl_id))
    return actions


@dataclass(frozen=True)
class EtlStatus:
    """One target's view of one ETL."""

    state: str = INITIALIZING
    reason: str = ""
    restarts: int = 0
    endpoint: str = ""
    fingerprint: str = ""
    updated: float = 0.0
    error: str = ""  # for Failed: the error class, e.g. EtlTimeout

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "restarts": self.restarts,
                "endpoint": self.endpoint, "fingerprint": self.fingerprint,
                "updated": self.updated, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EtlStatus:
        return cls(state=str(d.get("state", INITIALIZING)), reason=str(d.get("reason", "")),
                   restarts=int(d.get("restarts", 0)), endpoint=str(d.get("endpoint", "")),
                   fingerprint=str(d.get("fingerprint", "")),
                   updated=float(d.get("updated", 0.0)), error=str(d.get("error", "")))


def overall(statuses: dict[str, EtlStatus], targets: list[str]) -> tuple[str, list[str]]:
    """The ETL's state across ``targets``: Failed if any failed, Ready if all are.

    Returns the state and, for Failed, one reason line per failed target.
    """
    failed = [f"target {t}: {statuses[t].reason}" for t in targets
              if t in statuses and statuses[t].state == FAILED]
    if failed:
        return FAILED, failed
    if targets and all(t in statuses and statuses[t].state == READY for t in targets):
        return READY, []
    return INITIALIZING, []
