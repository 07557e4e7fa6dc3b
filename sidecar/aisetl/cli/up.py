"""``aisetl up``: a whole cluster on one machine, supervised in the foreground.

Starts one gateway and N targets as separate processes (each in its own
process group, each told by the kernel to die with us via PR_SET_PDEATHSIG),
restarts any that crash (with backoff), and on SIGINT/SIGTERM stops them all:
SIGTERM to each group, then SIGKILL to whatever is left after a grace period.
A target's data lives in ``<state>/targets/<id>`` and survives restarts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started: float = 0.0
    log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)
        self.started = time.monotonic()

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def run_up(args: argparse.Namespace) -> int:
    if args.targets < 1:
        print("aisetl up: --targets must be at least 1", file=sys.stderr)
        return 2
    state = Path(args.state).resolve()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "aisetl.cli.daemon", "--log-level", args.log_level]
    children = [Child("gateway", [*py, "gateway", "--port", str(args.port), "--state",
                                  str(state), "--expect-targets", str(args.targets)],
                      logs / "gateway.log")]
    for i in range(1, args.targets + 1):
        tid = f"t{i}"
        # a fixed port per target: a restarted target comes back at the same URL
        children.append(Child(tid, [*py, "target", "--id", tid, "--node", "local",
                                    "--port", str(_free_port()),
                                    "--data", str(state / "targets" / tid),
                                    "--state", str(state)], logs / f"{tid}.log"))

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    for c in children:
        c.start()
    endpoint = f"http://127.0.0.1:{args.port}"
    announced = False
    deadline = time.monotonic() + 60
    try:
        while not stopping:
            now = time.monotonic()
            for c in children:
                assert c.proc is not None
                code = c.proc.poll()
                if code is None:
                    continue
                if c.next_start == 0.0:
                    backoff = min(30.0, 0.5 * 2 ** min(c.restarts, 6))
                    if now - c.started > 60:
                        backoff = 0.5  # it ran fine for a while: restart quickly
                    c.next_start = now + backoff
                    print(f"aisetl: {c.name} exited with code {code}; restarting in "
                          f"{backoff:.1f}s (log: {c.log_path})", file=sys.stderr, flush=True)
                elif now >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    c.start()
            if not announced:
                status, body = _get(endpoint + "/v1/health", timeout=0.5)
                if status == 200:
                    announced = True
                    print(f"aisetl: cluster up at {endpoint} with {args.targets} targets "
                          f"(state {state})", flush=True)
                    print(f"aisetl: export AIS_ENDPOINT={endpoint}", flush=True)
                elif now > deadline:
                    deadline = float("inf")
                    detail = json.loads(body) if body.startswith(b"{") else {}
                    print(f"aisetl: still waiting for targets ({detail}); see logs in {logs}",
                          file=sys.stderr, flush=True)
            time.sleep(0.1)
    finally:
        print("aisetl: stopping", file=sys.stderr, flush=True)
        for c in children:
            c.signal_group(signal.SIGTERM)
        grace = time.monotonic() + 10
        for c in children:
            assert c.proc is not None
            try:
                c.proc.wait(timeout=max(0.1, grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            c.signal_group(signal.SIGKILL)  # also any grandchild left in the group
            c.proc.wait()
    return 0
