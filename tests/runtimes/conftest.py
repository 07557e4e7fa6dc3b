"""Real runtime servers as subprocesses on loopback, and a real fake target.

``launch`` starts ``runtimes/<name>/server.py`` with a user module written to
tmp_path and waits (bounded) for ``/health``; at teardown it stops the server
and fails the test if any of its processes is left behind. ``fake_target`` is
an aiohttp server answering ``GET AIS_TARGET_URL/<bucket>/<object>`` the way a
storage target does.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

RUNTIMES_DIR = Path(__file__).resolve().parents[2] / "runtimes"


def find_python27() -> str | None:
    """A real Python 2.7 to run the python2 runtime under, if this machine has one."""
    candidates = [os.environ.get("AISETL_TEST_PYTHON27", "")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python")))
    candidates += ["/usr/bin/python2.7", "/usr/local/bin/python2.7"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


PYTHON27 = find_python27()
# runtime id -> (server directory, interpreter); "python2.7" runs the python2
# runtime under a real Python 2.7 (skipped where there is none).
INTERPRETERS = {
    "python3": ("python3", sys.executable),
    "python2": ("python2", sys.executable),
    "python2.7": ("python2", PYTHON27),
}
SECRET = "s3cr3t"
HEALTH_DEADLINE_SECONDS = 20.0

# One user module for most behaviours, in the Python 2/3 common subset so both
# runtimes load it.
MD5_CODE = """
import hashlib
import os
import time


def transform(input_bytes):
    if input_bytes.startswith(b"raise:"):
        raise ValueError("bad input: " + input_bytes[6:].decode("utf-8"))
    if input_bytes.startswith(b"pid"):
        if input_bytes == b"pid-slow":
            time.sleep(0.05)
        return str(os.getpid()).encode("ascii")
    return hashlib.md5(input_bytes).hexdigest().encode("ascii")
"""


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RuntimeServer:
    runtime: str
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    seen: dict[int, psutil.Process] = field(default_factory=dict)  # for teardown

    def workers(self) -> list[psutil.Process]:
        found = psutil.Process(self.proc.pid).children(recursive=True)
        self.seen.update((p.pid, p) for p in found)
        return found

    def live_worker_pids(self) -> set[int]:
        """PIDs of workers that are running: a worker reaped between the listing
        and the status read (a race with the parent's waitpid) counts as gone."""
        live = set()
        for proc in self.workers():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.add(proc.pid)
            except psutil.NoSuchProcess:
                continue
        return live

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *self.workers()]

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_DEADLINE_SECONDS
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"{self.runtime} server exited with {self.proc.returncode}:\n"
                        + self.stderr()
                    )
                try:
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200 and await resp.text() == "ok":
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)  # poll interval, bounded by the deadline
        pytest.fail(f"{self.runtime} server not healthy in time:\n" + self.stderr())

    async def wait_exit(self, within: float = 20.0) -> int:
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{self.runtime} server still running after {within}s")
            await asyncio.sleep(0.02)
        return self.proc.returncode


def spawn(cmd: list[str], env: dict[str, str], stderr_path: Path) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as err:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)


Launch = Callable[..., Awaitable[RuntimeServer]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    started: list[RuntimeServer] = []

    async def _launch(
        runtime: str,
        code: str = MD5_CODE,
        *,
        target_url: str = "http://127.0.0.1:9/v1/etl/objects/none",
        workers: int | None = 2,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wait: bool = True,
    ) -> RuntimeServer:
        directory, interpreter = INTERPRETERS[runtime]
        if interpreter is None:
            pytest.fail("python2.7 was parametrized without an interpreter (see PYTHON27)")
        n = len(started)
        code_path = tmp_path / f"code{n}.py"
        code_path.write_text(code)
        stderr_path = tmp_path / f"server{n}.stderr"
        port = port or free_port()
        cmd = [
            interpreter,
            str(RUNTIMES_DIR / directory / "server.py"),
            "--code",
            str(code_path),
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        full_env = dict(os.environ, AIS_TARGET_URL=target_url, **(env or {}))
        server = RuntimeServer(runtime, spawn(cmd, full_env, stderr_path), port, stderr_path)
        started.append(server)
        if wait:
            await server.wait_healthy()
        return server

    yield _launch

    leftovers = []
    for server in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            server.workers()
        tree = list(server.seen.values())  # includes workers of a parent that was killed
        server.proc.terminate()
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for proc in alive:
            leftovers.append(proc.pid)
            proc.kill()
    assert not leftovers, f"runtime processes outlived their server: {leftovers}"


@dataclass
class FakeTarget:
    """What a storage target serves at AIS_TARGET_URL."""

    url: str
    objects: dict[tuple[str, str], bytes]
    raw_paths: list[str] = field(default_factory=list)


@pytest.fixture
async def fake_target(aiohttp_server: Callable[..., Awaitable[object]]) -> FakeTarget:
    objects: dict[tuple[str, str], bytes] = {
        ("bkt", "dir/sub/a b%.txt"): b"nested object body\n",
        ("bkt", "plain"): b"some text :)\n",
    }
    raw_paths: list[str] = []

    async def get_object(request: web.Request) -> web.StreamResponse:
        raw_paths.append(request.raw_path)
        key = (request.match_info["bucket"], request.match_info["object"])
        if key not in objects:
            return web.Response(status=404, text=f"object {key[0]}/{key[1]} does not exist")
        return web.Response(body=objects[key], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/v1/etl/objects/" + SECRET + "/{bucket}/{object:.+}", get_object)
    server = await aiohttp_server(app)
    url = str(server.make_url("/v1/etl/objects/" + SECRET))  # type: ignore[attr-defined]
    return FakeTarget(url=url, objects=objects, raw_paths=raw_paths)
