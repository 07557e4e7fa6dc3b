"""``aisetl``: run one role per process, or a whole local cluster.

    aisetl up [--targets N] [--port P] [--state DIR]   gateway + N targets, foreground
    aisetl gateway [--host H] [--port P] [--state DIR] [--control local|kubernetes]
    aisetl target  [--id ID] [--host H] [--port P] [--data DIR] [--state DIR] ...

This is the one place that reads environment variables (AISETL_*, K8S_HOST_NAME,
POD_*) and turns flags into settings objects; everything below gets those.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from aisetl.control.base import ControlStore
from aisetl.model.cluster import TargetInfo
from aisetl.observability import logging as obs_logging
from aisetl.observability.metrics import Metrics
from aisetl.settings import ClusterSettings, GatewaySettings, TargetSettings


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(os.environ.get("AISETL_STATE", os.path.join(base, "aisetl")))


def make_control(kind: str, state_dir: Path, cluster: ClusterSettings) -> ControlStore:
    if kind == "local":
        from aisetl.control.local import LocalControlStore

        return LocalControlStore(state_dir, dead_after=cluster.dead_after,
                                 poll_interval=cluster.poll_interval)
    if kind == "kubernetes":
        from aisetl.control import kubernetes as k8s

        return k8s.KubernetesControlStore.from_environment()
    raise SystemExit(f"aisetl: --control {kind!r}: use 'local' or 'kubernetes'")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"aisetl: cannot listen on {host}:{port}: {e.strerror}: "
                         "choose another --port") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve(app: web.Application, sock: socket.socket) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, shutdown_timeout=5.0)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_gateway(args: argparse.Namespace) -> int:
    obs_logging.configure("gateway", args.log_level)
    cluster = ClusterSettings()
    settings = GatewaySettings(host=args.host, port=args.port, state_dir=Path(args.state),
                               control=args.control, expect_targets=args.expect_targets,
                               cluster=cluster)
    sock = _bind(settings.host, settings.port)

    async def main() -> None:
        from aisetl.gateway.app import create_app

        control = make_control(settings.control, settings.state_dir, cluster)
        app = create_app(settings, control, Metrics.create())
        try:
            await _serve(app, sock)
        finally:
            await control.close()

    asyncio.run(main())
    return 0


def run_target(args: argparse.Namespace) -> int:
    obs_logging.configure("target", args.log_level)
    cluster = ClusterSettings()
    node = args.node or os.environ.get("K8S_HOST_NAME") or socket.gethostname()
    target_id = args.id or os.environ.get("POD_NAME") or node
    settings = TargetSettings(id=target_id, host=args.host, port=args.port, node=node,
                              data_dir=Path(args.data), state_dir=Path(args.state),
                              control=args.control, orchestrator=args.orchestrator,
                              cluster=cluster)
    if args.container_engine:
        settings.etl.container_engine = args.container_engine
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    adv_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    settings.advertise_url = args.advertise_url or f"http://{adv_host}:{port}"

    async def main() -> None:
        from aisetl.target.app import create_app

        control = make_control(settings.control, settings.state_dir, cluster)
        me = TargetInfo(id=settings.id, url=settings.advertise_url, node=settings.node)
        app = create_app(settings, control, me, Metrics.create())
        try:
            await _serve(app, sock)
        finally:
            await control.close()

    asyncio.run(main())
    return 0


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="aisetl",
        description="AIS-ETL daemons: an object store whose targets transform data in place.")
    p.add_argument("--log-level", default=env("AISETL_LOG_LEVEL", "info"),
                   help="debug, info, warning or error (env AISETL_LOG_LEVEL)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a local cluster (gateway + targets) in the foreground",
                        description="Start one gateway and N targets as separate processes on "
                        "this machine. Stays in the foreground; Ctrl-C (or SIGTERM) stops "
                        "every process it started.")
    up.add_argument("--targets", type=int, default=3, help="number of targets (default 3)")
    up.add_argument("--port", type=int, default=int(env("AISETL_PORT", "8080")),
                    help="gateway port on 127.0.0.1 (default 8080)")
    up.add_argument("--state", default=str(default_state_dir()),
                    help="state directory: control records and each target's data "
                    "(default $AISETL_STATE or ~/.local/share/aisetl)")

    gw = sub.add_parser("gateway", help="run one gateway",
                        description="Run one gateway: it redirects object requests to the "
                        "owner target and answers bucket, cluster and ETL requests.")
    gw.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    gw.add_argument("--port", type=int, default=8080, help="listen port (default 8080)")
    gw.add_argument("--state", default=str(default_state_dir()),
                    help="state directory of the local control store")
    gw.add_argument("--control", default=env("AISETL_CONTROL", "local"),
                    choices=["local", "kubernetes"], help="control store (default local)")
    gw.add_argument("--expect-targets", type=int, default=1,
                    help="/v1/health is 200 once this many targets joined (default 1)")

    tg = sub.add_parser("target", help="run one storage target",
                        description="Run one storage target: it stores the objects placed on "
                        "it and runs one transformer per declared ETL.")
    tg.add_argument("--id", default="", help="target ID (default $POD_NAME or the node name)")
    tg.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    tg.add_argument("--port", type=int, default=0, help="listen port (default: any free)")
    tg.add_argument("--advertise-url", default="",
                    help="URL that peers use to reach this target (default http://host:port)")
    tg.add_argument("--node", default="", help="node name (default $K8S_HOST_NAME or hostname)")
    tg.add_argument("--data", required=True, help="data directory of this target")
    tg.add_argument("--state", default=str(default_state_dir()),
                    help="state directory of the local control store")
    tg.add_argument("--control", default=env("AISETL_CONTROL", "local"),
                    choices=["local", "kubernetes"], help="control store (default local)")
    tg.add_argument("--orchestrator", default=env("AISETL_ORCHESTRATOR", "local"),
                    choices=["local", "kubernetes"],
                    help="run transformers as local processes/containers or as pods")
    tg.add_argument("--container-engine", default=env("AISETL_CONTAINER_ENGINE"),
                    choices=["podman", "docker"], help="engine for init ETLs (default: detect)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "up":
        from aisetl.cli.up import run_up

        return run_up(args)
    if args.cmd == "gateway":
        return run_gateway(args)
    return run_target(args)


if __name__ == "__main__":
    sys.exit(main())
