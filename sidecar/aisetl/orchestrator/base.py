"""The orchestrator interface: start, watch and stop one transformer.

A target asks its orchestrator for one transformer per declared ETL. Locally a
transformer is a process (build runtimes) or a container (init specs); on
Kubernetes it is a pod pinned to the target's node. The reconciler above only
sees this interface: where the transformer listens, whether it is ready, how
it ended, its last log lines, and how to stop it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from aisetl.model.etl import EtlDeclaration


@dataclass(frozen=True)
class TransformerContext:
    """What a transformer needs to know about the target that runs it."""

    target_id: str
    target_url: str  # how this target is reached on loopback / inside the cluster
    secret: str  # AIS_TARGET_URL = <target_url>/v1/etl/objects/<secret>
    work_dir: Path  # per-target scratch space: code files, logs
    cache_dir: Path  # shared dependency cache (per runtime and dependency list)
    node: str = ""

    def ais_target_url(self, base: str | None = None) -> str:
        return f"{base or self.target_url}/v1/etl/objects/{self.secret}"


class Transformer(abc.ABC):
    """One running transformer of one ETL on one target."""

    etl_id: str
    endpoint: str = ""
    """Base URL the target uses (hpush, hrev)."""
    public_endpoint: str = ""
    """Base URL a client is redirected to (hpull)."""

    @abc.abstractmethod
    async def wait_ready(self, timeout: float) -> None:
        """Return once the transformer answers; raise EtlTimeout or EtlFailed."""

    @abc.abstractmethod
    async def wait_exit(self) -> str:
        """Block until the transformer ends; return why (exit code, signal, reason)."""

    @abc.abstractmethod
    async def logs(self, tail: int = 50) -> str:
        """Its last ``tail`` log lines (stdout and stderr)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop it and release everything it held; safe to call twice."""


class Orchestrator(abc.ABC):
    @abc.abstractmethod
    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        """Launch a transformer for ``decl`` (do not wait for readiness)."""

    async def cleanup_stale(self, ctx: TransformerContext) -> None:  # noqa: B027 - optional
        """Remove transformers a previous run of this target left behind."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release the orchestrator's own resources."""


def tail_lines(text: str, n: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[-n:])
