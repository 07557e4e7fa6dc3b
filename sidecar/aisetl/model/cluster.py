"""Cluster membership records and bucket records, as every layer sees them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TargetInfo:
    """One storage target as the cluster map knows it."""

    id: str
    url: str  # where clients and peers reach it, e.g. http://127.0.0.1:9001
    node: str = ""  # the machine / Kubernetes node it runs on
    heartbeat: float = 0.0  # wall-clock seconds of its last heartbeat (local store)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetInfo:
        return cls(id=str(d["id"]), url=str(d["url"]), node=str(d.get("node", "")),
                   heartbeat=float(d.get("heartbeat", 0.0)))


@dataclass(frozen=True)
class BucketInfo:
    name: str
    provider: str = "ais"
    created: float = 0.0
    props: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BucketInfo:
        return cls(name=str(d["name"]), provider=str(d.get("provider", "ais")),
                   created=float(d.get("created", 0.0)), props=dict(d.get("props") or {}))
