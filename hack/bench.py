#!/usr/bin/env python3
"""aisetl benchmarks against baselines and peers, measured in the same run.

    python hack/bench.py [--quick] [--json PATH] [--only inline,runtime,offline,memory]
    python hack/bench.py --profile DIR      # py-spy profiles of the inline hpush 1 MiB path

Starts its own local cluster (``aisetl up`` as a subprocess: 1 gateway, 3
targets, a temporary state directory), loads it from an aiohttp client on
loopback and prints a markdown table; ``--json PATH`` writes the same rows as a
list of ``{"name", "ours", "baseline", "ratio", "unit"}``.

``ratio`` is always "higher is better": ours / baseline for throughput, and
baseline / ours for latency and memory rows (their unit says "inverted").
A row that could not be measured has ``ours`` (and ``ratio``) null and says
why in its name ("n/a (...)"); no number is ever made up.

Every load loop is bounded both in request count and in time, and sends
traffic to 127.0.0.1 only. Client and cluster share the machine's CPUs: on a
2-core machine the client's own cost is part of every number (of ours and of
the baselines alike), so compare ratios, not absolute values across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sidecar"))

from tests.support.cluster import LocalCluster, free_port  # noqa: E402
from tests.support.memory import RssSampler  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HOST = "127.0.0.1"
COMMS = ("hpush", "hrev", "hpull")

CODE = {
    "identity": "def transform(input_bytes):\n    return input_bytes\n",
    "md5": textwrap.dedent("""\
        import hashlib

        def transform(input_bytes):
            md5 = hashlib.md5()
            md5.update(input_bytes)
            return md5.hexdigest().encode()
        """),
    "stream-identity": textwrap.dedent("""\
        async def transform_stream(chunks):
            async for chunk in chunks:
                yield chunk
        """),
    "resize": textwrap.dedent("""\
        import io
        from PIL import Image

        def transform(input_bytes):
            img = Image.open(io.BytesIO(input_bytes)).convert("RGB")
            img = img.resize((224, 224))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=90)
            return out.getvalue()
        """),
}


def _has_len(size: int, b: bytes) -> bool:
    return len(b) == size


def md5_bytes(b: bytes) -> bytes:
    return hashlib.md5(b).hexdigest().encode()


def resize_bytes(b: bytes) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(b)).convert("RGB").resize((224, 224))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


LOCAL_XF: dict[str, Callable[[bytes], bytes]] = {"md5": md5_bytes, "resize": resize_bytes,
                                                 "identity": lambda b: b}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size_name(n: int) -> str:
    if n >= GiB:
        return f"{n // GiB}GiB"
    if n >= MiB:
        return f"{n // MiB}MiB"
    return f"{n // KiB}KiB"


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    name: str
    ours: float | None
    baseline: float | None
    unit: str
    invert: bool = False  # latency/memory: lower is better, ratio = baseline / ours

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or self.ours <= 0 or self.baseline <= 0:
            return None
        return self.baseline / self.ours if self.invert else self.ours / self.baseline

    def to_dict(self) -> dict[str, Any]:
        r = self.ratio
        return {"name": self.name, "ours": _round(self.ours), "baseline": _round(self.baseline),
                "ratio": None if r is None else round(r, 3), "unit": self.unit}


def _round(v: float | None) -> float | None:
    if v is None:
        return None
    return round(v, 3) if abs(v) < 100 else round(v, 1)


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def markdown(rows: list[Row]) -> str:
    out = ["| name | ours | baseline | ratio | unit |", "|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}"
        out.append(f"| {r.name} | {fmt(r.ours)} | {fmt(r.baseline)} | {ratio} | {r.unit} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTTP helpers
class BenchError(Exception):
    pass


async def expect(r: aiohttp.ClientResponse, *ok: int) -> bytes:
    body = await r.read()
    if r.status not in ok:
        raise BenchError(f"{r.method} {r.url} -> {r.status}: {body[:300]!r}")
    return body


async def create_bucket(s: aiohttp.ClientSession, ep: str, name: str) -> None:
    async with s.post(f"{ep}/v1/buckets/{name}", json={"action": "create-bck"}) as r:
        await expect(r, 200)


async def put_object(s: aiohttp.ClientSession, ep: str, bucket: str, obj: str,
                     data: bytes | Callable[[], AsyncIterator[bytes]],
                     size: int | None = None) -> None:
    async with s.put(f"{ep}/v1/objects/{bucket}/{obj}", allow_redirects=False) as r:
        await expect(r, 307)
        loc = r.headers["Location"]
    headers = {"Content-Length": str(size)} if size is not None else None
    body = data if isinstance(data, bytes) else data()
    async with s.put(loc, data=body, headers=headers) as r:
        await expect(r, 200)


async def put_many(ep: str, bucket: str, items: list[tuple[str, bytes]], conc: int = 16) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        it = iter(items)

        async def worker() -> None:
            for name, data in it:
                await put_object(s, ep, bucket, name, data)

        await asyncio.gather(*(worker() for _ in range(conc)))


async def build_etl(ep: str, etl_id: str, code: str, comm: str, timeout: float = 180) -> None:
    body = {"id": etl_id, "runtime": "python3", "encoding": "base64",
            "code": base64.b64encode(code.encode()).decode(), "dependencies": "",
            "communication_type": f"{comm}://", "wait_timeout": "2m"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(f"{ep}/v1/etl/build", json=body) as r:
            await expect(r, 200)


async def stop_etl(ep: str, etl_id: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.delete(f"{ep}/v1/etl/stop/{etl_id}") as r:
            await r.read()


def gen_bytes(n: int, seed: int) -> bytes:
    """Deterministic, incompressible-enough bytes without os.urandom per object."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


# ----------------------------------------------------------------------------- load loop
@dataclass
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mibps(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float | None:
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


async def load(urls: list[str], obj_size: int, conc: int, max_requests: int, seconds: float,
               client_xf: str | None = None, method: str = "GET", body: bytes | None = None,
               check: Callable[[bytes], bool] | None = None) -> LoadResult:
    """GET (or PUT/POST) ``urls`` round-robin with ``conc`` requests in flight.

    Stops issuing after ``max_requests`` or ``seconds``; in-flight requests
    finish (bounded by a hard timeout). Bytes counted are the source object's.
    """
    assert all(u.startswith(f"http://{HOST}:") for u in urls)
    counter = itertools.count()
    res = LoadResult(0, 0.0, 0)
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=max(60.0, seconds * 4), sock_connect=10)
    xf = LOCAL_XF.get(client_xf) if client_xf else None

    async def one(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            k = next(counter)
            if k >= max_requests:
                return
            url = urls[k % len(urls)]
            t0 = time.perf_counter()
            try:
                async with s.request(method, url, data=body) as r:
                    if r.status != 200:
                        txt = await r.read()
                        raise BenchError(f"{method} {url} -> {r.status}: {txt[:300]!r}")
                    if xf is not None or check is not None:
                        data = await r.read()  # the client transforms whole objects
                        if xf is not None:
                            xf(data)
                        if check is not None and not check(data):
                            raise BenchError(f"unexpected body from {url}: {data[:100]!r}")
                    else:
                        async for _ in r.content.iter_chunked(MiB):
                            pass
            except (aiohttp.ClientError, TimeoutError, BenchError) as e:
                res.errors += 1
                if res.errors > 5:
                    raise BenchError(f"too many errors, last: {e}") from e
                continue
            res.latencies.append(time.perf_counter() - t0)
            res.requests += 1
            res.bytes += obj_size

    conn = aiohttp.TCPConnector(limit=0, limit_per_host=conc)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout,
                                     auto_decompress=False) as s:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(s) for _ in range(conc))),
                               seconds + max(60.0, seconds * 4))
        res.seconds = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- settings
@dataclass
class Plan:
    quick: bool
    comms: tuple[str, ...] = COMMS
    xfs: tuple[str, ...] = ("identity", "md5")
    sizes: tuple[int, ...] = (KiB, MiB, 64 * MiB)

    @property
    def seconds(self) -> float:
        return 2.0 if self.quick else 8.0

    @property
    def warmup(self) -> float:
        return 0.4 if self.quick else 1.5

    def objects(self, size: int) -> int:
        if size <= KiB:
            return 200
        if size <= MiB:
            return 48
        return 3 if self.quick else 6

    def conc(self, size: int) -> int:
        return 16 if size <= MiB else 4

    def max_requests(self, size: int) -> int:
        return 200_000 if size <= MiB else (40 if self.quick else 200)

    @property
    def offline_objects(self) -> int:
        return 1000 if self.quick else 10_000

    @property
    def jpeg_objects(self) -> int:
        return 100 if self.quick else 500


# ----------------------------------------------------------------------------- inline
async def bench_inline(c: LocalCluster, plan: Plan, rows: list[Row]) -> None:
    ep = c.endpoint
    sizes = list(plan.sizes)
    log("inline: uploading objects")
    async with aiohttp.ClientSession() as s:
        await create_bucket(s, ep, "inline")
    names: dict[int, list[str]] = {}
    for size in sizes:
        n = plan.objects(size)
        names[size] = [f"{size_name(size)}/obj-{i:04d}" for i in range(n)]
        if size > MiB:
            for i, name in enumerate(names[size]):
                await put_many(ep, "inline", [(name, gen_bytes(size, i))], conc=1)
        else:
            await put_many(ep, "inline", [(nm, gen_bytes(size, i))
                                          for i, nm in enumerate(names[size])])

    def urls(size: int, etl: str | None = None) -> list[str]:
        q = f"?uuid={etl}" if etl else ""
        return [f"{ep}/v1/objects/inline/{n}{q}" for n in names[size]]

    async def measure(size: int, etl: str | None = None, client_xf: str | None = None,
                      check: Callable[[bytes], bool] | None = None) -> LoadResult:
        u = urls(size, etl)
        conc = plan.conc(size)
        await load(u, size, conc, max(conc * 2, 8), plan.warmup, client_xf, check=check)
        return await load(u, size, conc, plan.max_requests(size), plan.seconds, client_xf,
                          check=check)

    def unit_tp(size: int) -> str:
        return "req/s" if size <= KiB else "MiB/s"

    def tp(r: LoadResult, size: int) -> float:
        return r.rps if size <= KiB else r.mibps

    # warm the cluster (connections, caches) so the first baseline is not penalised
    await load(urls(min(sizes)), min(sizes), 16, 2000, 1.0)
    plain: dict[int, LoadResult] = {}
    client: dict[tuple[str, int], LoadResult] = {}
    for size in sizes:
        plain[size] = await measure(size)
        log(f"plain GET {size_name(size)}: {plain[size].rps:.0f} req/s "
            f"{plain[size].mibps:.0f} MiB/s p50 {plain[size].pct(0.5):.1f} ms "
            f"(n={plain[size].requests})")
        for xf in plan.xfs:
            client[xf, size] = await measure(size, client_xf=xf)
            log(f"client GET+{xf} {size_name(size)}: {client[xf, size].rps:.0f} req/s")

    for xf in plan.xfs:
        for comm in plan.comms:
            etl = f"bench-{xf}-{comm}"
            t0 = time.monotonic()
            try:
                await build_etl(ep, etl, CODE[xf], comm)
            except BenchError as e:
                for size in sizes:
                    rows.append(Row(f"inline {comm} {xf} {size_name(size)} n/a (build failed: "
                                    f"{str(e)[:80]})", None, None, unit_tp(size)))
                continue
            log(f"ETL {etl} ready in {time.monotonic() - t0:.1f}s")
            try:
                for size in sizes:
                    sz = size_name(size)
                    expected_md5 = None
                    check = None
                    if xf == "md5":
                        expected_md5 = {md5_bytes(gen_bytes(size, i)) for i in
                                        range(len(names[size]))}
                        check = expected_md5.__contains__
                    elif size <= MiB:
                        check = functools.partial(_has_len, size)
                    try:
                        r = await measure(size, etl, check=check)
                    except BenchError as e:
                        rows.append(Row(f"inline {comm} {xf} {sz} n/a ({str(e)[:100]})", None,
                                        tp(plain[size], size), unit_tp(size)))
                        continue
                    log(f"inline {comm} {xf} {sz}: {r.rps:.1f} req/s {r.mibps:.0f} MiB/s "
                        f"p50 {r.pct(0.5):.1f} p99 {r.pct(0.99):.1f} ms (n={r.requests})")
                    p = plain[size]
                    rows.append(Row(f"inline {comm} {xf} {sz}", tp(r, size), tp(p, size),
                                    unit_tp(size)))
                    rows.append(Row(f"inline {comm} {xf} {sz} p50", r.pct(0.5), p.pct(0.5),
                                    "ms (ratio inverted)", invert=True))
                    rows.append(Row(f"inline {comm} {xf} {sz} p99", r.pct(0.99), p.pct(0.99),
                                    "ms (ratio inverted)", invert=True))
                    cl = client[xf, size]
                    rows.append(Row(f"inline {comm} {xf} {sz} vs client-side {xf}", tp(r, size),
                                    tp(cl, size), unit_tp(size)))
            finally:
                await stop_etl(ep, etl)


# ----------------------------------------------------------------------------- runtime
AIOHTTP_ECHO = textwrap.dedent("""\
    import hashlib, sys
    from aiohttp import web
    op = sys.argv[2]
    async def h(r):
        b = await r.read()
        return web.Response(body=hashlib.md5(b).hexdigest().encode() if op == "md5" else b)
    async def health(r):
        return web.Response(text="ok")
    app = web.Application(client_max_size=0)
    app.router.add_post("/", h); app.router.add_put("/", h); app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """)

THREADING_ECHO = textwrap.dedent("""\
    import hashlib, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    op = sys.argv[2]
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        def log_message(self, *a):
            pass
        def _reply(self, b):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)
        def do_POST(self):
            b = self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(hashlib.md5(b).hexdigest().encode() if op == "md5" else b)
        do_PUT = do_POST
        def do_GET(self):
            self._reply(b"ok")
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """)


@contextlib.contextmanager
def server_proc(argv: list[str], port: int, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{argv[:3]} exited with {proc.returncode}")
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{argv[:3]} did not listen") from None
                time.sleep(0.05)
        time.sleep(0.3)  # let every worker come up
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def bench_runtime(plan: Plan, rows: list[Row], work: Path) -> None:
    cases = [("echo", "identity", KiB), ("md5", "md5", MiB)]
    for label, code_name, size in cases:
        body = gen_bytes(size, 7)
        conc = 16
        results: dict[str, float] = {}
        code = work / f"rt-{code_name}.py"
        code.write_text(CODE[code_name])
        op = "md5" if code_name == "md5" else "echo"
        servers = {
            "ours": [sys.executable, str(ROOT / "runtimes/python3/server.py"), "--code",
                     str(code), "--listen", HOST],
            "aiohttp": [sys.executable, "-c", AIOHTTP_ECHO],
            "threading": [sys.executable, "-c", THREADING_ECHO],
        }
        for who, argv in servers.items():
            port = free_port()
            argv = [*argv, "--port", str(port)] if who == "ours" else [*argv, str(port), op]
            with server_proc(argv, port):
                url = [f"http://{HOST}:{port}/"]
                await load(url, size, conc, 400, plan.warmup, method="POST", body=body)
                r = await load(url, size, conc, 1_000_000, plan.seconds, method="POST",
                               body=body)
            results[who] = r.rps
            log(f"runtime {who} {label} {size_name(size)}: {r.rps:.0f} req/s")
        workers = min(4, os.cpu_count() or 1)
        rows.append(Row(f"runtime python3 ({workers} workers) {label} {size_name(size)} "
                        "vs aiohttp (1 process)", results["ours"], results["aiohttp"], "req/s"))
        rows.append(Row(f"runtime python3 ({workers} workers) {label} {size_name(size)} "
                        "vs ThreadingHTTPServer", results["ours"], results["threading"],
                        "req/s"))


# ----------------------------------------------------------------------------- memory
def transformer_procs(target: psutil.Process, etl: str) -> list[psutil.Process]:
    out = []
    for p in target.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(etl in a for a in p.cmdline()):
                out.append(p)
    return out


def owner_target(c: LocalCluster, bucket: str, obj: str) -> psutil.Process:
    from tests.support.cluster import http

    status, _, hdrs = http("GET", f"{c.endpoint}/v1/objects/{bucket}/{obj}")
    assert status == 307, status
    port = int(hdrs["Location"].split("/")[2].split(":")[1])
    for t in c.smap():
        if t["url"].endswith(f":{port}"):
            return c.role_process(t["id"])
    raise BenchError("owner target not found")


async def bench_memory(c: LocalCluster, plan: Plan, rows: list[Row]) -> None:
    ep = c.endpoint
    size = GiB
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await create_bucket(s, ep, "mem")

        async def chunks() -> AsyncIterator[bytes]:
            block = gen_bytes(MiB, 1)
            for _ in range(size // MiB):
                yield block

        log("memory: uploading a 1 GiB object")
        await put_object(s, ep, "mem", "one-gib", chunks, size=size)
    gateway = c.role_process("gateway")
    target = owner_target(c, "mem", "one-gib")
    for comm in COMMS:
        etl = f"bench-mem-{comm}"
        await build_etl(ep, etl, CODE["stream-identity"], comm)
        try:
            tprocs = transformer_procs(target, etl)
            if not tprocs:
                raise BenchError(f"no transformer processes found for {etl}")
            url = f"{ep}/v1/objects/mem/one-gib?uuid={etl}"
            # warm the path with a small read so connections and workers exist at rest
            await load([f"{ep}/v1/objects/mem/one-gib"], size, 1, 1, 0.1)
            await asyncio.sleep(0.5)
            groups = {"gateway": [gateway], "target": [target], "transformer": tprocs}
            with RssSampler(groups) as m:
                r = await load([url], size, 1, 1, 1.0)
            log(f"memory {comm}: 1 GiB in {r.seconds:.1f}s ({r.mibps:.0f} MiB/s); "
                + ", ".join(f"{k} {m.base[k] / MiB:.0f}->{m.peak[k] / MiB:.0f} MiB"
                            for k in groups))
            for k in groups:
                rows.append(Row(f"memory {comm} 1GiB peak RSS {k}", m.peak[k] / MiB,
                                m.base[k] / MiB, "MiB (baseline: at rest; ratio inverted)",
                                invert=True))
        except BenchError as e:
            rows.append(Row(f"memory {comm} 1GiB n/a ({str(e)[:100]})", None, None, "MiB"))
        finally:
            await stop_etl(ep, etl)


# ----------------------------------------------------------------------------- offline
async def offline_available(ep: str) -> str | None:
    """None if the gateway knows ``etlbck``; else the reason it does not."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{ep}/v1/buckets/bench-probe-nonexistent",
                          json={"action": "etlbck", "name": "bench-probe-dst",
                                "value": {"id": "bench-probe"}}) as r:
            body = await r.text()
            if r.status == 400 and "not a bucket action" in body:
                try:
                    return json.loads(body).get("message", body)[:120]
                except ValueError:
                    return body[:120]
            return None


async def run_offline_job(ep: str, etl: str, src: str, dst: str, timeout: float,
                          expect_objects: int | None = None) -> float:
    """Start an etlbck job, wait for it, return its wall time in seconds."""
    msg = {"action": "etlbck", "name": dst, "value": {"id": etl}}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{ep}/v1/buckets/{src}", json=msg) as r:
            body = (await expect(r, 200)).decode().strip()
        try:
            parsed = json.loads(body)
            xid = parsed if isinstance(parsed, str) else (parsed.get("id") or
                                                           parsed.get("uuid"))
        except ValueError:
            xid = body
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            async with s.get(f"{ep}/v1/xactions/{xid}") as r:
                last = await r.json(content_type=None) if r.status == 200 else await r.text()
            if isinstance(last, dict):
                state = str(last.get("state") or last.get("status") or "").lower()
                if state in ("aborted", "failed", "error"):
                    raise BenchError(f"job {xid} {state}: {str(last)[:200]}")
                if last.get("finished") is True or state in (
                        "finished", "done", "succeeded", "completed", "complete"):
                    secs = time.perf_counter() - t0
                    if last.get("errors"):
                        raise BenchError(f"job {xid}: {last['errors']} objects failed: "
                                         f"{str(last.get('error_list'))[:150]}")
                    if expect_objects is not None and last.get("objects") != expect_objects:
                        raise BenchError(f"job {xid} transformed {last.get('objects')} "
                                         f"objects, expected {expect_objects}")
                    return secs
            await asyncio.sleep(0.1)
        raise BenchError(f"job {xid} not finished in {timeout:.0f}s (last: {str(last)[:200]})")


def _direct_one(args: tuple[str, str, str]) -> int:
    src, dst, op = args
    with open(src, "rb") as f:
        data = f.read()
    out = LOCAL_XF[op](data)
    tmp = dst + ".part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, out)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    return len(out)


def settle_io(max_wait: float = 30.0, below: float = 5.0) -> None:
    """Flush dirty pages, then wait (bounded) until the disk is quiet again.

    Every offline row fsyncs each result, and an fsync waits behind whatever
    writeback is still going on (the upload just before, the baseline's own
    source files); on a shared virtual disk that alone moved the baseline by
    2x. Quiet = Linux's I/O pressure ("some avg10", /proc/pressure/io) below
    ``below`` percent; without PSI only the sync is done.
    """
    os.sync()
    psi = Path("/proc/pressure/io")
    deadline = time.monotonic() + max_wait
    while psi.exists() and time.monotonic() < deadline:
        fields = dict(kv.split("=") for kv in psi.read_text().split("\n")[0].split()[1:])
        if float(fields.get("avg10", "0")) < below:
            return
        time.sleep(0.5)


def direct_baseline(files: list[Path], out_dir: Path, op: str) -> float:
    """Read, transform and write (fsync + rename, as the store does) with a process pool."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(f), str(out_dir / f"{i:06d}.out"), op) for i, f in enumerate(files)]
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    with ctx.Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(_direct_one, jobs, chunksize=16):
            pass
    return time.perf_counter() - t0


RAY_SCRIPT = textwrap.dedent("""\
    import hashlib, io, json, os, sys, time
    import ray
    files, out_dir, op = json.load(open(sys.argv[1]))
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False

    def xf(row):
        data = row["bytes"]
        if op == "md5":
            out = hashlib.md5(data).hexdigest().encode()
        else:
            from PIL import Image
            img = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224))
            b = io.BytesIO(); img.save(b, format="JPEG", quality=90); out = b.getvalue()
        dst = os.path.join(out_dir, hashlib.sha1(row["path"].encode()).hexdigest())
        fd = os.open(dst + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, out); os.fsync(fd); os.close(fd); os.replace(dst + ".part", dst)
        return {"n": len(out)}

    os.makedirs(out_dir, exist_ok=True)
    # warm-up on a few files so worker start-up is not timed
    ray.data.read_binary_files(files[:8], include_paths=True).map(xf).materialize()
    t0 = time.perf_counter()
    # materialize(): count() alone may skip the map (Ray answers it from metadata)
    ray.data.read_binary_files(files, include_paths=True).map(xf).materialize()
    secs = time.perf_counter() - t0
    written = len([f for f in os.listdir(out_dir) if not f.endswith(".part")])
    print(json.dumps({"seconds": secs, "n": written}))
    """)


def ray_baseline(files: list[Path], out_dir: Path, op: str, work: Path,
                 timeout: float) -> tuple[float | None, str]:
    try:
        import ray  # noqa: F401
    except ImportError:
        return None, "ray not installed: pip install 'ray[data]'"
    spec = work / f"ray-{op}.json"
    spec.write_text(json.dumps([[str(f) for f in files], str(out_dir), op]))
    script = work / "ray_job.py"
    script.write_text(RAY_SCRIPT)
    try:
        p = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True,
                           text=True, timeout=timeout,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    except subprocess.TimeoutExpired:
        return None, f"ray run exceeded {timeout:.0f}s"
    for line in reversed(p.stdout.splitlines()):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            res = json.loads(line)
            if res["n"] < len(set(files)):
                return None, f"ray wrote {res['n']} of {len(files)} outputs"
            return float(res["seconds"]), ""
    return None, f"ray failed: {(p.stderr or p.stdout)[-150:]!r}"


def sample_jpegs() -> list[Path]:
    found: list[Path] = []
    with contextlib.suppress(ImportError):
        import matplotlib

        found += sorted(Path(matplotlib.get_data_path(), "sample_data").rglob("*.jpg"))
    with contextlib.suppress(ImportError):
        import skimage

        found += sorted(Path(skimage.__file__).parent.joinpath("data").rglob("*.jpg"))
    return found


async def bench_offline(c: LocalCluster, plan: Plan, rows: list[Row], work: Path) -> None:
    ep = c.endpoint
    why_not = await offline_available(ep)
    n = plan.offline_objects
    jpegs = sample_jpegs()
    jobs: list[tuple[str, str, list[tuple[str, bytes]]]] = [
        ("md5", f"{n}x64KiB", [(f"o{i:06d}", gen_bytes(64 * KiB, i)) for i in range(n)])]
    if jpegs:
        srcs = [p.read_bytes() for p in jpegs]
        jobs.append(("resize", f"{plan.jpeg_objects} JPEGs",
                     [(f"img{i:05d}.jpg", srcs[i % len(srcs)]) for i in range(plan.jpeg_objects)]))
    else:
        rows.append(Row("offline resize n/a (no sample JPEGs: pip install matplotlib)",
                        None, None, "obj/s"))
    for op, label, items in jobs:
        count = len(items)
        files_dir = work / f"direct-{op}-src"
        files_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for name, data in items:
            f = files_dir / name
            f.write_bytes(data)
            files.append(f)
        # best of two, each after the disk settled: right after writing the files
        # the fsyncs wait behind writeback (measured: 1,050-2,150 obj/s, then ~2,000)
        runs = []
        for k in range(2):
            settle_io()
            runs.append(direct_baseline(files, work / f"direct-{op}-out{k}", op))
        direct_s = min(runs)
        log(f"offline {op} direct baseline: {count / direct_s:.0f} obj/s")
        ray_s, ray_why = (None, "skipped") if plan.quick and why_not else ray_baseline(
            files, work / f"ray-{op}-out", op, work, timeout=300)
        if ray_s is not None:
            log(f"offline {op} ray: {count / ray_s:.0f} obj/s")
        ours: float | None = None
        reason = ""
        if why_not:
            reason = f"offline jobs not available: {why_not}"
        else:
            try:
                src, dst, etl = f"off-{op}-src", f"off-{op}-dst", f"bench-off-{op}"
                async with aiohttp.ClientSession() as s:
                    await create_bucket(s, ep, src)
                log(f"offline {op}: uploading {count} objects")
                await put_many(ep, src, items)
                await build_etl(ep, etl, CODE[op], "hpush")
                await asyncio.to_thread(settle_io)
                try:
                    secs = await run_offline_job(ep, etl, src, dst, timeout=900,
                                                 expect_objects=count)
                finally:
                    await stop_etl(ep, etl)
                ours = count / secs
                log(f"offline {op} ours: {ours:.0f} obj/s")
            except BenchError as e:
                reason = str(e)[:120]
        sfx = f" n/a ({reason})" if ours is None else ""
        rows.append(Row(f"offline {op} {label} vs direct{sfx}", ours, count / direct_s,
                        "obj/s"))
        rsfx = sfx or (f" n/a (ray: {ray_why})" if ray_s is None else "")
        rows.append(Row(f"offline {op} {label} vs Ray Data{rsfx}", ours,
                        None if ray_s is None else count / ray_s, "obj/s"))
        shutil.rmtree(files_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- profile
def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


async def cpu_breakdown(c: LocalCluster, urls: list[str], size: int, seconds: float,
                        etl: str | None) -> str:
    """CPU milliseconds per request of each role (no profiler attached)."""
    targets = [c.role_process(t["id"]) for t in c.smap()]
    roles = {"client (this process)": [psutil.Process()],
             "gateway": [c.role_process("gateway")], "targets": targets,
             "transformers": [p for t in targets for p in transformer_procs(t, etl)]
             if etl else []}
    before = {k: cpu_seconds(v) for k, v in roles.items()}
    r = await load(urls, size, 16, 1_000_000, seconds)
    parts = [f"{k} {1000 * (cpu_seconds(v) - before[k]) / max(r.requests, 1):.2f}"
             for k, v in roles.items() if v]
    return (f"{r.rps:.0f} req/s ({r.mibps:.0f} MiB/s), CPU ms per request: "
            + ", ".join(parts))


async def profile(c: LocalCluster, out: Path, seconds: float, spy: bool = True) -> None:
    """CPU per role, then py-spy of gateway, one target and its transformer (hpush md5 1 MiB)."""
    ep = c.endpoint
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    async with aiohttp.ClientSession() as s:
        await create_bucket(s, ep, "prof")
    names = [f"p{i:03d}" for i in range(48)]
    await put_many(ep, "prof", [(n, gen_bytes(MiB, i)) for i, n in enumerate(names)])
    etl = "bench-prof-md5"
    await build_etl(ep, etl, CODE["md5"], "hpush")
    target = owner_target(c, "prof", names[0])
    tprocs = transformer_procs(target, etl)
    parent = min(tprocs, key=lambda p: p.pid)
    plain = [f"{ep}/v1/objects/prof/{n}" for n in names]
    urls = [u + f"?uuid={etl}" for u in plain]
    await load(urls, MiB, 16, 200, 1.0)
    await load(plain, MiB, 16, 200, 1.0)
    print("## CPU per request (1 MiB objects, 16 in flight)\n")
    for _ in range(2):
        print(f"plain GET:      {await cpu_breakdown(c, plain, MiB, seconds / 2, None)}")
        print(f"hpush md5 GET:  {await cpu_breakdown(c, urls, MiB, seconds / 2, etl)}")
    if not spy:
        await stop_etl(ep, etl)
        return
    cmds = {
        "gateway": ["--pid", str(c.role_process("gateway").pid)],
        "target": ["--pid", str(target.pid)],
        "transformer": ["--pid", str(parent.pid), "--subprocesses"],
    }
    procs = []
    for name, args in cmds.items():
        procs.append(subprocess.Popen(  # noqa: ASYNC220 - py-spy runs alongside
            ["py-spy", "record", "--format", "raw", "--rate", "200", "--duration",
             str(int(seconds)), "--output", str(out / f"{name}.txt"), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    await asyncio.sleep(1.0)
    r = await load(urls, MiB, 16, 1_000_000, seconds - 2)
    for p in procs:
        p.wait(timeout=seconds + 30)
    log(f"profiled load (py-spy attached): {r.rps:.0f} req/s, {r.mibps:.0f} MiB/s")
    for name in cmds:
        path = out / f"{name}.txt"
        if path.exists():
            print(f"\n## {name}: top frames by own samples\n")
            print(summarize_raw(path))
    await stop_etl(ep, etl)


IDLE_FRAMES = ("EpollSelector.select", "_worker (concurrent/futures/thread.py:81)",
               "_do_waitpid", "Supervisor.run (server.py", "Condition.wait",
               "Event.wait", "select.select")


def summarize_raw(path: Path, top: int = 15) -> str:
    """Own and inclusive shares of the busy samples (idle waits left out)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        k = int(n)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(frames[-1].startswith(i) or i in frames[-1] for i in IDLE_FRAMES):
            idle += k
            continue
        total += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    total = max(total, 1)
    lines = [f"busy samples {total}, idle samples {idle} (left out)", "own:"]
    for f, k in sorted(own.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {100 * k / total:5.1f}%  {f}")
    lines.append("inclusive:")
    for f, k in sorted(incl.items(), key=lambda x: -x[1])[:top * 3]:
        lines.append(f"  {100 * k / total:5.1f}%  {f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / GiB
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}, {platform.system()} "
            f"{platform.release()}")


async def run(args: argparse.Namespace) -> list[Row]:
    sizes = {"1KiB": KiB, "1MiB": MiB, "64MiB": 64 * MiB}
    plan = Plan(args.quick)
    if args.comms:
        plan.comms = tuple(args.comms.split(","))
    if args.transforms:
        plan.xfs = tuple(args.transforms.split(","))
    if args.sizes:
        plan.sizes = tuple(sizes[x] for x in args.sizes.split(","))
    only = set(args.only.split(",")) if args.only else {"inline", "runtime", "offline",
                                                          "memory"}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aisetl-bench-") as tmp:
        work = Path(tmp)
        if "runtime" in only:
            await bench_runtime(plan, rows, work)
        need_cluster = bool(only & {"inline", "offline", "memory"}) or args.profile
        if not need_cluster:
            return rows
        c = LocalCluster(work / "state", targets=3)
        c.start(timeout=60)
        try:
            if args.profile:
                await profile(c, Path(args.profile), args.profile_seconds,
                              spy=not args.cpu_only)
                return rows
            if "inline" in only:
                await bench_inline(c, plan, rows)
            if "offline" in only:
                await bench_offline(c, plan, rows, work)
            if "memory" in only:
                await bench_memory(c, plan, rows)
        finally:
            c.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, fewer objects (< 5 min)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("--only", help="comma-separated subset: inline,runtime,offline,memory")
    p.add_argument("--comms", help="inline rows: subset of hpush,hrev,hpull")
    p.add_argument("--transforms", help="inline rows: subset of identity,md5")
    p.add_argument("--sizes", help="inline rows: subset of 1KiB,1MiB,64MiB")
    p.add_argument("--profile", metavar="DIR",
                   help="instead of the table: py-spy the inline hpush md5 1 MiB path")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--cpu-only", action="store_true",
                   help="with --profile: only CPU ms per request per role, no py-spy")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    log(f"machine: {machine()}")
    rows = asyncio.run(run(args))
    elapsed = time.monotonic() - t0
    if args.profile:
        log(f"profiles in {args.profile} ({elapsed:.0f}s)")
        return 0
    print(f"\naisetl bench ({'quick' if args.quick else 'full'}), {machine()}, "
          f"{elapsed:.0f} s\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
