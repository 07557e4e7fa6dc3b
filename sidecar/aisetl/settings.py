"""Settings of every process, as grouped dataclasses with defaults.

Environment variables and command-line flags are read in one place, the entry
point (``cli/daemon.py``); everything below receives these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ClusterSettings:
    """Membership timing, shared by gateways and targets."""

    heartbeat_interval: float = 0.5
    """Seconds between a target's heartbeats (local control store)."""
    dead_after: float = 3.0
    """A target whose last heartbeat is older than this has left the map."""
    poll_interval: float = 0.1
    """How often the local control store looks for changes to report to watchers."""


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8080
    """Port to listen on."""
    state_dir: Path = Path(".")
    """State directory of the local control store."""
    control: str = "local"
    """Control store: 'local' (state dir) or 'kubernetes'."""
    expect_targets: int = 1
    """/v1/health answers 200 once at least this many targets have joined."""
    cluster: ClusterSettings = field(default_factory=ClusterSettings)


@dataclass
class EtlSettings:
    """How a target runs transformers."""

    runtimes_dir: Path = Path(__file__).resolve().parents[2] / "runtimes"
    """Where the runtime servers live (runtimes/<name>/server.py)."""
    workers: int = 0
    """Worker processes per build-runtime transformer (0: the runtime's default)."""
    restart_backoff: float = 0.5
    """First delay before restarting a crashed transformer; doubles up to 30 s."""
    max_restart_backoff: float = 30.0
    """Upper bound of the restart delay."""
    container_engine: str | None = None
    """'podman' or 'docker'; None picks the first that works."""
    connections_per_transformer: int = 64
    """Connection pool size between a target and one transformer."""
    offline_concurrency: int = 8
    """Objects an offline job transforms at once on one target."""


@dataclass
class TargetSettings:
    id: str = "t1"
    """Target ID: stable across restarts (its data dir belongs to it)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """Port to listen on (0: any free port, advertised through membership)."""
    advertise_url: str = ""
    """URL peers use to reach this target (default: http://host:port)."""
    node: str = ""
    """Node (machine) name; K8S_HOST_NAME on Kubernetes."""
    data_dir: Path = Path("data")
    """Where this target keeps its objects."""
    state_dir: Path = Path(".")
    """State directory of the local control store (also dependency cache)."""
    control: str = "local"
    """Control store: 'local' or 'kubernetes'."""
    orchestrator: str = "local"
    """Transformers as 'local' processes/containers or 'kubernetes' pods."""
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    etl: EtlSettings = field(default_factory=EtlSettings)


CHUNK_SIZE = 1 << 20
"""Bytes per read/write when streaming object bodies."""
