"""The python3 build runtime: serve a user's transform over HTTP, in several processes.

A storage target starts one of these per ``build`` ETL:

    python server.py --code PATH/code.py --listen 127.0.0.1 --port PORT [--workers N]

User code contracts (the module at ``--code``; define one of the two):

``def transform(input_bytes: bytes) -> bytes``
    The seed's contract. The whole object arrives as ``bytes``; the return
    value (``bytes``, ``bytearray`` or ``memoryview``) is the transformed object.

``async def transform_stream(chunks)``
    An async generator: ``chunks`` is an async iterator of ``bytes`` (about
    1 MiB each); yield ``bytes`` of the output as they are ready. The server
    streams request body -> function -> chunked response, so an object never
    has to fit in memory. If both are defined, ``transform_stream`` wins.

HTTP API:

- ``PUT /`` or ``POST /`` (hpush): body = the object; 200 with the result.
- ``GET /<bucket>/<object...>`` (hrev, hpull): the object is read from
  ``$AIS_TARGET_URL/<bucket>/<object>``; a non-200 from there is passed on
  with its status and body text; an unreachable target is a 502.
- ``POST /batch`` (offline jobs): many small objects in one request, each
  transformed on its own; only with ``transform`` (not ``transform_stream``,
  whose callers expect streaming). Request body: frames ``name_len (u16) |
  size (u64) | name | size bytes`` (big-endian) back to back. Response
  (chunked): one frame per request frame, in order, ``status (u8) | size
  (u64) | size bytes`` with status 0 = the result, 1 = the transform raised
  (the bytes are ``<ExceptionType>: <message>``), 2 = the request is broken
  from here on (the message; nothing follows). A broken first frame is a
  400. Objects above ``BATCH_MAX_OBJECT`` and names above ``BATCH_MAX_NAME``
  are refused before they are read.
- ``GET /health``: 200 ``ok``; with the header ``X-Aisetl-Batch: 1`` when
  ``POST /batch`` is served (a target only batches when it sees it).
- A transform that raises: 500 with body ``<ExceptionType>: <message>``, the
  traceback goes to stderr, and the server keeps serving. If a streaming
  transform fails after the response has started, the connection is dropped
  so the client sees a truncated (not a successful) chunked response.

Processes. User code is CPU-bound and holds the GIL, so one event loop cannot
run two transforms at once. The parent imports the user module once to
validate it (exit 1 with the reason on stderr if it cannot be loaded, before
anything listens), binds one SO_REUSEPORT listening socket per worker (see
``listen_sockets``), then spawns ``--workers`` (default env ``AISETL_WORKERS``,
else ``min(4, cpu_count)``) fresh interpreters of this same file; each
inherits its socket, imports the module and serves it with aiohttp. The parent
replaces a worker that dies (with backoff if it keeps dying), and on
SIGTERM/SIGINT stops them all and exits 0 within two seconds. Each worker asks
the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so no
worker outlives a killed parent.

Inside a worker ``transform`` runs in a one-thread executor, not on the event
loop: the loop keeps answering /health and moving bytes while a transform
runs, and transforms that release the GIL (hashlib, zlib, numpy) overlap with
request I/O. ``AISETL_TRANSFORM_EXECUTOR=direct`` calls it on the loop instead
(~10 % more requests/s for tiny pure-Python transforms). The measurements
behind this choice are in runtimes/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import importlib.util
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

READ_CHUNK = 1 << 20
BATCH_HEADER = "X-Aisetl-Batch"
BATCH_REQ = struct.Struct(">HQ")
BATCH_RESP = struct.Struct(">BQ")
BATCH_OK, BATCH_FAILED, BATCH_BROKEN = 0, 1, 2
BATCH_MAX_NAME = 4096
BATCH_MAX_OBJECT = 16 << 20
BATCH_WRITE = 256 << 10  # response frames are written in pieces of about this size
BATCH_GROUP, BATCH_GROUP_BYTES = 16, 1 << 20  # objects handed to the executor at once
STOP_GRACE_SECONDS = 1.5  # parent: SIGTERM to SIGKILL of its workers
WORKER_GRACE_SECONDS = 0.5  # worker: time in-flight requests get to finish
USER_MODULE_NAME = "aisetl_user_code"


# --------------------------------------------------------------------------- user code


class UserCodeError(Exception):
    """The user module cannot be used; the message is the one-line reason."""


def load_user_module(path: str) -> ModuleType:
    """Import the module at ``path`` and check it defines a transform."""
    if not os.path.isfile(path):
        raise UserCodeError(f"code file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(USER_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[USER_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(USER_MODULE_NAME, None)
        traceback.print_exc(file=sys.stderr)
        raise UserCodeError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    stream = getattr(module, "transform_stream", None)
    plain = getattr(module, "transform", None)
    if stream is not None and not callable(stream):
        raise UserCodeError(f"{path}: transform_stream is not callable")
    if stream is None and plain is None:
        raise UserCodeError(
            f"{path} defines neither transform(input_bytes) -> bytes "
            "nor async def transform_stream(chunks)"
        )
    if stream is None and not callable(plain):
        raise UserCodeError(f"{path}: transform is not callable")
    return module


def load_or_exit(path: str) -> ModuleType:
    try:
        return load_user_module(path)
    except UserCodeError as exc:
        log(f"cannot load user code: {exc}")
        sys.exit(1)


def log(message: str) -> None:
    print(f"aisetl-python3[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def as_output(result: Any) -> bytes | bytearray | memoryview:
    if isinstance(result, bytes | bytearray | memoryview):
        return result
    raise TypeError(f"transform must return bytes, not {type(result).__name__}")


# --------------------------------------------------------------------------- worker


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send us SIGTERM when the parent goes away (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)


async def _read_body(request: Any) -> bytes:
    """The whole body with one copy: ``request.read()`` copies it twice."""
    n = request.content_length
    if n is None:
        return await request.read()
    return await request.content.readexactly(n) if n else b""


async def _aiter_chunks(content: Any) -> AsyncIterator[bytes]:
    async for chunk in content.iter_chunked(READ_CHUNK):
        yield chunk


def build_app(module: ModuleType, target_url: str, executor: Any) -> Any:
    from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
    from yarl import URL

    transform: Callable[[bytes], Any] | None = getattr(module, "transform", None)
    transform_stream: Callable[[AsyncIterator[bytes]], Any] | None = getattr(
        module, "transform_stream", None
    )
    session_key = web.AppKey("session", ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[session_key] = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None, sock_connect=30),
            auto_decompress=False,
        )
        yield
        await app[session_key].close()

    def failure(exc: BaseException) -> web.Response:
        log("transform failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
        return web.Response(status=500, text=error_text(exc))

    async def run_plain(data: bytes) -> web.Response:
        assert transform is not None
        try:
            loop = asyncio.get_running_loop()
            if executor is None:
                out = as_output(transform(data))
            else:
                out = as_output(await loop.run_in_executor(executor, transform, data))
        except Exception as exc:
            return failure(exc)
        return web.Response(body=out, content_type="application/octet-stream")

    async def run_stream(request: web.Request, chunks: AsyncIterator[bytes]) -> web.StreamResponse:
        assert transform_stream is not None
        try:
            gen = transform_stream(chunks)
            if not hasattr(gen, "__anext__"):
                raise TypeError("transform_stream must be an async generator function")
            first = as_output(await gen.__anext__())
        except StopAsyncIteration:
            first = b""
            gen = None
        except Exception as exc:
            return failure(exc)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            if first:
                await resp.write(first)
            if gen is not None:
                async for piece in gen:
                    if piece:
                        await resp.write(as_output(piece))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log(
                "streaming transform failed after the response started; dropping connection:\n"
                + "".join(traceback.format_exception(exc)).rstrip()
            )
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    async def hpush(request: web.Request) -> web.StreamResponse:
        if transform_stream is not None:
            return await run_stream(request, _aiter_chunks(request.content))
        return await run_plain(await _read_body(request))

    async def from_target(request: web.Request) -> web.StreamResponse:
        bucket = request.match_info["bucket"]
        obj = request.match_info["object"]
        url = URL(
            target_url
            + "/"
            + urllib.parse.quote(bucket, safe="")
            + "/"
            + urllib.parse.quote(obj, safe="/"),
            encoded=True,
        )
        session = request.app[session_key]
        try:
            async with session.get(url) as upstream:
                if upstream.status != 200:
                    text = await upstream.text(errors="replace")
                    return web.Response(status=upstream.status, text=text)
                if transform_stream is not None:
                    return await run_stream(request, _aiter_chunks(upstream.content))
                data = await upstream.read()
        except ClientError as exc:
            log(f"reading {bucket}/{obj} from AIS_TARGET_URL failed: {error_text(exc)}")
            return web.Response(status=502, text=error_text(exc))
        return await run_plain(data)

    def transform_one(data: bytes) -> tuple[int, bytes | bytearray | memoryview]:
        """One object of a batch: (status, result or error text); never raises."""
        assert transform is not None
        try:
            return BATCH_OK, as_output(transform(data))
        except Exception as exc:
            log("transform failed:\n" + "".join(traceback.format_exception(exc)).rstrip())
            return BATCH_FAILED, error_text(exc).encode()

    def transform_many(group: list[bytes]) -> list[tuple[int, bytes | bytearray | memoryview]]:
        return [transform_one(data) for data in group]

    async def read_frame(content: Any, index: int) -> tuple[bytes, bytes] | str | None:
        """The next (name, data) of a batch; None at its end; a string says what is wrong."""
        try:
            head = await content.readexactly(BATCH_REQ.size)
        except asyncio.IncompleteReadError as exc:
            return f"frame {index}: body ends inside a frame header" if exc.partial else None
        name_len, size = BATCH_REQ.unpack(head)
        if not 0 < name_len <= BATCH_MAX_NAME:
            return f"frame {index}: name length {name_len} not within 1..{BATCH_MAX_NAME}"
        if size > BATCH_MAX_OBJECT:
            return f"frame {index}: object of {size} bytes is above {BATCH_MAX_OBJECT}"
        try:
            name = await content.readexactly(name_len)
            data = await content.readexactly(size) if size else b""
        except asyncio.IncompleteReadError:
            return f"frame {index}: body ends inside the frame"
        return name, data

    async def batch(request: web.Request) -> web.StreamResponse:
        if transform is None or transform_stream is not None:
            return web.Response(status=404, text="no batch endpoint: the transform streams")
        loop = asyncio.get_running_loop()
        resp: web.StreamResponse | None = None
        out: list[bytes | bytearray | memoryview] = []
        pending = 0
        index = 0
        done = False
        while not done:
            # a few frames at a time per executor call (one thread hand-off per group)
            group: list[bytes] = []
            size = 0
            problem = ""
            while len(group) < BATCH_GROUP and size < BATCH_GROUP_BYTES:
                index += 1
                frame = await read_frame(request.content, index)
                if frame is None or isinstance(frame, str):
                    problem, done = frame or "", True
                    break
                group.append(frame[1])
                size += len(frame[1])
            if problem and resp is None and not group:
                return web.Response(status=400, text=f"malformed batch: {problem}")
            if group:
                if executor is None:
                    results = transform_many(group)
                else:
                    results = await loop.run_in_executor(executor, transform_many, group)
                for status, result in results:
                    out += [BATCH_RESP.pack(status, len(result)), result]
                    pending += len(result)
            if problem:
                msg = problem.encode()
                out += [BATCH_RESP.pack(BATCH_BROKEN, len(msg)), msg]
            if resp is None and (out or not done):
                resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                resp.enable_chunked_encoding()
                await resp.prepare(request)
            if resp is not None and out and (pending >= BATCH_WRITE or done):
                await resp.write(b"".join(out))
                out, pending = [], 0
        if resp is None:
            return web.Response(body=b"", content_type="application/octet-stream")
        await resp.write_eof()
        return resp

    async def health(_: web.Request) -> web.Response:
        headers = {BATCH_HEADER: "1"} if transform_stream is None else {}
        return web.Response(text="ok", headers=headers)

    app = web.Application(client_max_size=0)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health", health)
    app.router.add_put("/", hpush)
    app.router.add_post("/", hpush)
    app.router.add_post("/batch", batch)
    app.router.add_get("/{bucket}/{object:.+}", from_target)
    return app


async def serve(sock: socket.socket, module: ModuleType, target_url: str, executor: Any) -> None:
    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(module, target_url, executor), access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, shutdown_timeout=WORKER_GRACE_SECONDS)
    await site.start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def worker_main(args: argparse.Namespace) -> int:
    die_with_parent(args.parent_pid)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(False)
    module = load_or_exit(args.code)
    target_url = os.environ.get("AIS_TARGET_URL", "").rstrip("/")
    executor = None
    if transform_executor() == "thread":
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="transform")
    asyncio.run(serve(sock, module, target_url, executor))
    # Skip interpreter shutdown: it would join the executor's thread, which may be
    # inside a transform that never returns.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- parent


class Supervisor:
    """Keep ``count`` workers alive on one listening socket until told to stop."""

    def __init__(self, args: argparse.Namespace, socks: list[socket.socket]) -> None:
        self.args = args
        self.socks = socks
        self.count = len(socks)
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.not_before: dict[int, float] = {}
        self.stopping = False

    def spawn(self, slot: int) -> None:
        fd = self.socks[slot].fileno()
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--code",
            self.args.code,
            "--worker-fd",
            str(fd),
            "--parent-pid",
            str(os.getpid()),
        ]
        self.workers[slot] = subprocess.Popen(cmd, pass_fds=[fd])
        self.started_at[slot] = time.monotonic()

    def reap(self) -> None:
        now = time.monotonic()
        for slot, proc in list(self.workers.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.workers[slot]
            lived = now - self.started_at[slot]
            self.failures[slot] = 0 if lived > 10 else self.failures.get(slot, 0) + 1
            delay = min(0.1 * 2 ** self.failures[slot], 10.0) if self.failures[slot] else 0.0
            self.not_before[slot] = now + delay
            log(f"worker {proc.pid} exited with {code}; restarting in {delay:.1f}s")

    def fill(self) -> float | None:
        """Start missing workers whose backoff expired; return seconds to the next one."""
        now = time.monotonic()
        wait: float | None = None
        for slot in range(self.count):
            if slot in self.workers:
                continue
            due = self.not_before.get(slot, 0.0)
            if due <= now:
                self.spawn(slot)
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return wait

    def run(self) -> int:
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.set_wakeup_fd(wfd)

        def on_stop(signum: int, _frame: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select()
        self.fill()
        log(
            f"serving {self.args.code} on {self.args.listen}:{self.args.port} "
            f"with {self.count} workers"
        )
        while not self.stopping:
            self.reap()
            wait = self.fill()
            timeout = 1.0 if wait is None else min(wait, 1.0)
            with contextlib.suppress(InterruptedError):
                select.select([rfd], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(rfd, 4096):
                    pass
        self.stop_all()
        return 0

    def stop_all(self) -> None:
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in self.workers.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def default_workers() -> int:
    env = os.environ.get("AISETL_WORKERS")
    if env:
        return int(env)
    return min(4, os.cpu_count() or 1)


def transform_executor() -> str:
    return os.environ.get("AISETL_TRANSFORM_EXECUTOR", "thread")


def parent_main(args: argparse.Namespace) -> int:
    count = args.workers if args.workers is not None else default_workers()
    if count < 1:
        log(f"--workers must be at least 1, got {count}")
        return 2
    if transform_executor() not in ("thread", "direct"):
        log(f"AISETL_TRANSFORM_EXECUTOR must be 'thread' or 'direct', not {transform_executor()!r}")
        return 2
    load_or_exit(args.code)
    try:
        socks = listen_sockets(args.listen, args.port, count)
    except OSError as exc:
        log(f"cannot listen on {args.listen}:{args.port}: {exc}")
        return 1
    return Supervisor(args, socks).run()


def listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker, all bound to ``host:port`` with SO_REUSEPORT.

    With one shared socket, asyncio accepts every queued connection in one go,
    so a burst of connections (a target opening its pool) lands on a single
    worker and stays there (keep-alive). Separate SO_REUSEPORT sockets let the
    kernel spread connections evenly over the workers. The parent keeps every
    socket open, so connections queued on a dying worker's socket wait for its
    replacement instead of being reset.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would let us share the port with a stale server of the same
    # user; a plain bind first makes "port in use" an error, as it should be.
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    socks = []
    for _ in range(count):
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.set_inheritable(True)
        socks.append(sock)
    return socks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="aisetl python3 build runtime")
    parser.add_argument("--code", required=True, help="path of the user's module")
    parser.add_argument("--listen", default="0.0.0.0", help="address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: $AISETL_WORKERS or min(4, cpus))",
    )
    parser.add_argument("--worker-fd", dest="fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fd is not None:
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
