"""Throughput of the build runtimes: ``python tests/runtimes/bench_runtimes.py``.

Not a test (pytest does not collect it). Starts a runtime server per
configuration on loopback and drives it with an aiohttp client for a few
seconds; prints requests/s and how the requests spread over worker PIDs.
The numbers behind the choices in runtimes/README.md come from this script.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]

CODE = {
    "md5": (
        "import hashlib, os\n"
        "def transform(b):\n"
        "    return (hashlib.md5(b).hexdigest() + ' ' + str(os.getpid())).encode()\n"
    ),
    "cpu": (
        "import os\n"
        "def transform(b):\n"
        "    n = 0\n"
        "    for i in range(100000):\n"  # a few ms of pure-Python work, holds the GIL
        "        n += i * i\n"
        "    return ('%d %d' % (n, os.getpid())).encode()\n"
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_health(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server not healthy")


async def drive(url: str, body: bytes, conns: int, seconds: float) -> tuple[float, dict[str, int]]:
    pids: collections.Counter[str] = collections.Counter()
    count = 0
    stop_at = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            async with session.put(url + "/", data=body) as r:
                text = await r.text()
                assert r.status == 200, text
                pids[text.split()[-1]] += 1
                count += 1

    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(conns)))
        elapsed = time.monotonic() - t0
    return count / elapsed, dict(pids)


async def bench(
    runtime: str, code: str, workers: int, executor: str, conns: int, seconds: float, body: bytes
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "code.py"
        path.write_text(CODE[code])
        port = free_port()
        env = dict(os.environ, AISETL_TRANSFORM_EXECUTOR=executor)
        proc = subprocess.Popen(  # noqa: ASYNC220 - fork/exec does not block the loop for long
            [
                sys.executable,
                str(ROOT / "runtimes" / runtime / "server.py"),
                "--code",
                str(path),
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_health(url, proc)
            await drive(url, body, conns, 0.5)  # warm up
            rps, pids = await drive(url, body, conns, seconds)
            spread = sorted(pids.values(), reverse=True)
            print(
                f"{runtime:8} {code:4} workers={workers} executor={executor:6} conns={conns:3} "
                f"{rps:8.0f} req/s  per-worker={spread}",
                flush=True,
            )
        finally:
            proc.terminate()
            proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    body = b"some text :)\n" * 80  # ~1 KiB
    cpus = os.cpu_count() or 1
    for code in ("md5", "cpu"):
        for workers in sorted({1, min(4, cpus)}):
            for executor in ("direct", "thread"):
                await bench("python3", code, workers, executor, args.conns, args.seconds, body)
        for workers in sorted({1, min(4, cpus)}):
            await bench("python2", code, workers, "-", args.conns, args.seconds, body)


if __name__ == "__main__":
    asyncio.run(main())
