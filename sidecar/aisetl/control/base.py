"""The control store interface every deployment implements.

Callers never poll: they ``watch()`` and re-read what they need when told that
a kind of record changed (level-based, as in controller-runtime). A watch that
breaks is re-established by the implementation, which then reports every kind
as changed, so callers re-read from scratch.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from aisetl.model.cluster import BucketInfo, TargetInfo

# kinds reported by watch()
BUCKETS = "buckets"
TARGETS = "targets"
ETLS = "etls"
ETL_STATUS = "etl-status"
XACTIONS = "xactions"
ALL_KINDS = (BUCKETS, TARGETS, ETLS, ETL_STATUS, XACTIONS)


class ControlStore(abc.ABC):
    # --- buckets -----------------------------------------------------------------
    @abc.abstractmethod
    async def create_bucket(self, info: BucketInfo) -> None:
        """Create a bucket record; raise BucketExists if the name is taken."""

    @abc.abstractmethod
    async def delete_bucket(self, name: str) -> None:
        """Remove a bucket record; raise BucketNotFound if there is none."""

    @abc.abstractmethod
    async def get_bucket(self, name: str) -> BucketInfo | None: ...

    @abc.abstractmethod
    async def list_buckets(self) -> list[BucketInfo]: ...

    # --- membership --------------------------------------------------------------
    @abc.abstractmethod
    async def heartbeat(self, target: TargetInfo) -> None:
        """Join the cluster, or say "still alive" (call it periodically)."""

    @abc.abstractmethod
    async def leave(self, target_id: str) -> None: ...

    @abc.abstractmethod
    async def live_targets(self) -> list[TargetInfo]:
        """Targets that are up now, sorted by ID."""

    # --- ETL declarations (ConfigMap-shaped documents) --------------------------
    @abc.abstractmethod
    async def create_etl(self, doc: dict[str, Any]) -> None:
        """Store a declaration; raise EtlExists if its ID (case-insensitively) is taken."""

    @abc.abstractmethod
    async def delete_etl(self, etl_id: str) -> None:
        """Remove a declaration and its status records; raise EtlNotFound if absent."""

    @abc.abstractmethod
    async def list_etls(self) -> list[dict[str, Any]]:
        """Every declaration document (unparsed; callers validate)."""

    @abc.abstractmethod
    async def put_etl_status(self, etl_id: str, target_id: str, status: dict[str, Any]) -> None:
        """Record one target's status of one ETL."""

    @abc.abstractmethod
    async def etl_statuses(self, etl_id: str) -> dict[str, dict[str, Any]]:
        """Status per target ID of one ETL."""

    # --- offline jobs --------------------------------------------------------------
    @abc.abstractmethod
    async def put_xaction(self, xid: str, record: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get_xaction(self, xid: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_xactions(self) -> list[dict[str, Any]]: ...

    # --- watching ------------------------------------------------------------------
    @abc.abstractmethod
    def watch(self) -> AsyncIterator[str]:
        """Yield a kind (BUCKETS, TARGETS, ...) each time records of it change.

        The first items yielded are every kind, so a fresh watcher reads all.
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (watch tasks, API clients)."""
