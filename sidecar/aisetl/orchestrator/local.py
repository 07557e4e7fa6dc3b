"""Local transformers: build runtimes as processes, init specs as containers.

Build (``python3``/``python2`` runtimes): the user's code is written to the
target's work dir, dependencies are installed once per (runtime, dependency
list) into ``<cache>/deps/<runtime>-<sha>`` with ``pip install --target``
under a file lock (targets on one machine share the cache; a failed install
is not cached and fails the ETL with pip's own message), and the runtime
server ``runtimes/<runtime>/server.py`` runs as a process group of its own on
a loopback port, told by the kernel to die with its target. The python2
runtime is a Python 2/3 common-subset file and runs under this Python here.

Init (pod specs): the spec's one container runs through podman (docker where
present) with the spec's image, command, args and env, its ``containerPort``
published on a loopback port, and ``AIS_TARGET_URL`` pointing at the target
through the engine's host-loopback address.

Readiness: build runtimes answer ``GET /health``. An arbitrary container
counts as ready once it answers any HTTP request on its port (the spec's
``readinessProbe.httpGet.path`` if given, else ``/``): the seed's md5 server
answers GET with 501, and that is an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import yaml

from aisetl.aio import cancel_and_wait
from aisetl.model.errors import EtlFailed, EtlTimeout
from aisetl.model.etl import EtlDeclaration
from aisetl.orchestrator import engine as engines
from aisetl.orchestrator.base import Orchestrator, Transformer, TransformerContext, tail_lines

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def _probe_http(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            await r.read()
            return True
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def _wait_http(session: aiohttp.ClientSession, url: str, timeout: float,
                     exited: asyncio.Future[str] | asyncio.Task[str], what: str,
                     logs: Transformer) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if exited.done():
            reason = exited.result()
            raise EtlFailed(f"{what} exited before it was ready ({reason}); last log lines:\n"
                            f"{await logs.logs(20) or '(no output)'}")
        if await _probe_http(session, url):
            return
        if time.monotonic() >= deadline:
            raise EtlTimeout(f"{what} was not ready within {timeout:g}s (wait_timeout); "
                             f"last log lines:\n{await logs.logs(20) or '(no output)'}")
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)


# --- build runtimes as processes ---------------------------------------------------------
class ProcessTransformer(Transformer):
    def __init__(self, etl_id: str, proc: asyncio.subprocess.Process, port: int,
                 log_path: Path, session: aiohttp.ClientSession) -> None:
        self.etl_id = etl_id
        self.proc = proc
        self.endpoint = self.public_endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.session = session
        self._exit = asyncio.ensure_future(self._wait())

    async def _wait(self) -> str:
        code = await self.proc.wait()
        return f"signal {-code}" if code < 0 else f"exit code {code}"

    async def wait_ready(self, timeout: float) -> None:
        await _wait_http(self.session, self.endpoint + "/health", timeout, self._exit,
                         f"transformer {self.etl_id} (pid {self.proc.pid})", self)

    async def wait_exit(self) -> str:
        return await asyncio.shield(self._exit)

    async def logs(self, tail: int = 50) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                return tail_lines(f.read().decode(errors="replace"), tail)
        except FileNotFoundError:
            return ""

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), 5)
            except TimeoutError:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left in the group
        await asyncio.shield(self._exit)


async def install_dependencies(runtime: str, deps: str, cache_dir: Path,
                               timeout: float) -> Path | None:
    """Install ``deps`` once per (runtime, list) into the cache; return the dir."""
    reqs = "\n".join(line.strip() for line in deps.splitlines()
                     if line.strip() and not line.strip().startswith("#"))
    if not reqs:
        return None
    key = hashlib.sha256(f"{runtime}\n{reqs}".encode()).hexdigest()[:16]
    root = cache_dir / "deps"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{runtime}-{key}"
    if (final / ".complete").exists():
        return final
    lock_fd = os.open(root / f"{runtime}-{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # poll a non-blocking lock: a cancelled waiter must not leave a thread
        # behind that takes the lock later and starts pip for a stopped ETL
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.2)
        if (final / ".complete").exists():
            return final
        staging = root / f".{runtime}-{key}.{uuid.uuid4().hex[:8]}"
        req_file = root / f".{runtime}-{key}.txt"
        req_file.write_text(reqs + "\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
            "--disable-pip-version-check", "--target", str(staging), "-r", str(req_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException as e:  # timed out, or cancelled because the ETL was stopped
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, TimeoutError):
                raise EtlTimeout(f"dependencies did not install within {timeout:g}s "
                                 "(wait_timeout): raise wait_timeout or trim the list") from e
            raise
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            msg = "\n".join(line for line in out.decode(errors="replace").splitlines()
                            if "WARNING: Running pip as" not in line)
            raise EtlFailed(f"dependencies failed to install (pip exit code "
                            f"{proc.returncode}):\n{tail_lines(msg, 15)}")
        (staging / ".complete").write_text(reqs + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return final
    finally:
        os.close(lock_fd)


class ProcessOrchestrator(Orchestrator):
    """Runs build runtimes as local processes."""

    def __init__(self, runtimes_dir: Path, session: aiohttp.ClientSession,
                 workers: int = 0) -> None:
        self.runtimes_dir = runtimes_dir
        self.session = session
        self.workers = workers

    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        server = self.runtimes_dir / decl.runtime / "server.py"
        if not server.is_file():
            raise EtlFailed(f"runtime {decl.runtime!r} is not installed here ({server} is "
                            "missing)", etl=decl.id)
        started = time.monotonic()
        deps_dir = await install_dependencies(decl.runtime, decl.deps, ctx.cache_dir,
                                              decl.wait_timeout_seconds)
        etl_dir = ctx.work_dir / decl.id
        etl_dir.mkdir(parents=True, exist_ok=True)
        code = etl_dir / "code.py"
        code.write_text(decl.code)
        log_path = etl_dir / "transformer.log"
        env = {**os.environ, "AIS_TARGET_URL": ctx.ais_target_url(),
               "PYTHONUNBUFFERED": "1", "AISETL_ETL_ID": decl.id}
        if deps_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(deps_dir), env.get("PYTHONPATH", "")) if p)
        port = free_port()
        argv = [sys.executable, str(server), "--code", str(code), "--listen", "127.0.0.1",
                "--port", str(port)]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, env=env, cwd=etl_dir,
                start_new_session=True, preexec_fn=_die_with_parent)
        t = ProcessTransformer(decl.id, proc, port, log_path, self.session)
        t.install_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        return t


# --- init specs as containers ------------------------------------------------------------
class ContainerTransformer(Transformer):
    def __init__(self, etl_id: str, engine: engines.ContainerEngine, container: str,
                 port: int, probe_path: str, session: aiohttp.ClientSession) -> None:
        self.etl_id = etl_id
        self.engine = engine
        self.container = container
        self.endpoint = self.public_endpoint = f"http://127.0.0.1:{port}"
        self.probe_path = probe_path
        self.session = session
        self._exit = asyncio.ensure_future(self._wait())
        self._stopped = False

    async def _wait(self) -> str:
        delay = 0.2
        while True:
            info = await self.engine.exit_info(self.container)
            if info is None:
                return "container removed"
            if not info.running and info.exit_code is not None:
                why = f"exit code {info.exit_code}"
                if info.oom_killed:
                    why += " (out of memory)"
                if info.error:
                    why += f": {info.error}"
                return why
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def wait_ready(self, timeout: float) -> None:
        await _wait_http(self.session, self.endpoint + self.probe_path, timeout, self._exit,
                         f"container {self.container}", self)

    async def wait_exit(self) -> str:
        return await asyncio.shield(self._exit)

    async def logs(self, tail: int = 50) -> str:
        try:
            return await self.engine.logs(self.container, tail=tail)
        except engines.ContainerEngineError as e:
            return f"(no logs: {e})"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._exit)
        with contextlib.suppress(engines.ContainerEngineError):
            await self.engine.remove(self.container, grace=1)


class ContainerOrchestrator(Orchestrator):
    """Runs init specs as local containers (podman, or docker)."""

    LABEL_TARGET = "aisetl.target"

    def __init__(self, session: aiohttp.ClientSession, preferred: str | None = None) -> None:
        self.session = session
        self.preferred = preferred
        self._engine: engines.ContainerEngine | None = None
        self._detected = False

    async def engine(self) -> engines.ContainerEngine | None:
        if not self._detected:
            self._engine = await engines.detect_engine(self.preferred)
            self._detected = True
        return self._engine

    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        engine = await self.engine()
        if engine is None:
            self._detected = False  # look again next time: it may get installed
            raise EtlFailed(engines.NO_ENGINE_MESSAGE, etl=decl.id)
        c = decl.container
        port = free_port()
        target_port = ctx.target_url.rsplit(":", 1)[-1]
        env = {**c.env,
               "AIS_TARGET_URL": ctx.ais_target_url(
                   f"http://{engine.host_loopback_address}:{target_port}")}
        name = f"aisetl-{ctx.target_id}-{decl.id}-{uuid.uuid4().hex[:6]}".lower()
        try:
            container = await engine.run(
                name=name, image=c.image, command=c.command or None, args=c.args or None,
                env=env, host_port=port, container_port=c.port,
                labels={self.LABEL_TARGET: _target_label(ctx), "aisetl.etl": decl.id})
        except engines.ContainerEngineError as e:
            await asyncio.shield(_remove_quietly(engine, name))
            raise EtlFailed(f"container {name} did not start: {e}", etl=decl.id) from e
        except BaseException:  # cancelled (ETL stopped) mid-run: a container may exist
            await asyncio.shield(_remove_quietly(engine, name))
            raise
        return ContainerTransformer(decl.id, engine, container, port,
                                    _probe_path(decl.spec), self.session)

    async def cleanup_stale(self, ctx: TransformerContext) -> None:
        engine = await self.engine()
        if engine is not None:
            with contextlib.suppress(engines.ContainerEngineError):
                await engine.remove_labelled(self.LABEL_TARGET, _target_label(ctx))


async def _remove_quietly(engine: engines.ContainerEngine, name: str) -> None:
    with contextlib.suppress(engines.ContainerEngineError):
        await engine.remove(name)


def _target_label(ctx: TransformerContext) -> str:
    """Unique per target process home: target IDs repeat across local clusters."""
    digest = hashlib.sha256(str(ctx.work_dir.resolve()).encode()).hexdigest()[:12]
    return f"{ctx.target_id}-{digest}"


def _probe_path(spec: str) -> str:
    try:
        c = yaml.safe_load(spec)["spec"]["containers"][0]
        path = c["readinessProbe"]["httpGet"]["path"]
        return str(path) if str(path).startswith("/") else "/" + str(path)
    except (KeyError, TypeError, IndexError, yaml.YAMLError):
        return "/"


class LocalOrchestrator(Orchestrator):
    """Dispatches build declarations to processes and init ones to containers."""

    def __init__(self, runtimes_dir: Path, session: aiohttp.ClientSession, workers: int = 0,
                 container_engine: str | None = None) -> None:
        self.processes = ProcessOrchestrator(runtimes_dir, session, workers)
        self.containers = ContainerOrchestrator(session, container_engine)

    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        if decl.kind == "build":
            return await self.processes.start(decl, ctx)
        return await self.containers.start(decl, ctx)

    async def cleanup_stale(self, ctx: TransformerContext) -> None:
        await self.containers.cleanup_stale(ctx)
