"""A real local cluster for tests: ``aisetl up`` as a subprocess.

Nothing is mocked: the gateway and every target are separate processes that
talk HTTP on loopback, exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, bytes, dict[str, str]]:
    """One HTTP request that does NOT follow redirects; returns (status, body, headers)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class LocalCluster:
    def __init__(self, state: Path, targets: int = 3, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.state = state
        self.n_targets = targets
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state / "up.log"

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.state.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aisetl.cli.daemon", "up", "--targets", str(self.n_targets),
             "--port", str(self.port), "--state", str(self.state)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_healthy(timeout)
        return self

    def healthy(self) -> bool:
        try:
            return http("GET", self.endpoint + "/v1/health", timeout=2)[0] == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"aisetl up exited: {self.log.read_text()[-3000:]}")
            return self.healthy()

        wait_until(ok, timeout, "cluster health")

    def smap(self) -> list[dict[str, Any]]:
        return json.loads(http("GET", self.endpoint + "/v1/cluster/map")[1])["targets"]

    def processes(self) -> list[psutil.Process]:
        """``aisetl up`` and every process below it."""
        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def find_role(self, role: str) -> psutil.Process | None:
        """The live process of 'gateway' or of a target ID such as 't1', if any."""
        for p in self.processes():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if role == "gateway" and "gateway" in cmd:
                return p
            if "target" in cmd and "--id" in cmd and cmd[cmd.index("--id") + 1] == role:
                return p
        return None

    def role_process(self, role: str) -> psutil.Process:
        p = self.find_role(role)
        if p is None:
            raise LookupError(f"no live process for {role}")
        return p

    def target_data(self, tid: str) -> Path:
        return self.state / "targets" / tid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return code

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
