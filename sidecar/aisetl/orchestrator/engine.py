"""The adapter boundary to a local container engine (podman, or docker).

What it owns: turning "run this container of an init ETL's pod spec" into one
`podman run` (or `docker run`) command line, and the few other engine calls the
local orchestrator needs (is it running, how did it exit, its logs, remove it,
remove everything we labelled). It knows nothing about ETLs, readiness or
restarts; the orchestrator above it does. Every call is an
`asyncio.create_subprocess_exec` of the engine's CLI with a timeout, so the
event loop never blocks and no engine API library is needed.

Why the flags are what they are (checked on this project's machines, see
shared/ENVIRONMENT.md, "Containers"):

- ``--runtime runc`` (podman, when runc is installed): crun fails here on the
  hybrid cgroup v1/v2 layout.
- ``--cgroup-manager cgroupfs`` (podman, when systemd is not booted): there is
  no systemd to hand cgroups to.
- ``--network slirp4netns:allow_host_loopback=true`` (podman): user-mode
  networking, so the host only ever sees loopback traffic; the default bridge
  network routes through non-loopback addresses and must not be used. With
  ``allow_host_loopback`` the host's 127.0.0.1 is reachable from inside the
  container as 10.0.2.2 (:attr:`ContainerEngine.host_loopback_address`), which
  is how a transformer reaches its target (``AIS_TARGET_URL``).
- ``-p 127.0.0.1:HOST:CONTAINER``: the transformer is published on loopback
  only, on a host port the caller chose.
- ``--ulimit nofile=1024:1024 --ulimit nproc=1024:1024`` (clamped to our own
  hard limits): podman's defaults are above the sandbox's hard limits and the
  container fails to start ("error setting rlimit ... operation not
  permitted"). Both are always passed: passing one brings back podman's
  default for the other.
- ``--pull=never``: there is no registry; an image that is not present locally
  fails fast with :class:`ImageNotFoundError` naming the image (build it with
  hack/container-setup.sh / hack/build-seed-image.sh).
- No ``--rm`` by default: a container removed on exit takes its exit code and
  logs with it, and the orchestrator needs both to report why a transformer
  failed. The orchestrator calls :meth:`ContainerEngine.remove` when it is done,
  and :meth:`ContainerEngine.remove_labelled` cleans up after a crash of the
  target itself. ``auto_remove=True`` gives ``--rm`` for callers that want it.
- ``--log-driver k8s-file --log-opt max-size=10mb`` (podman): logs work without
  journald and cannot fill the disk.
- Environment values go through a private ``--env-file`` rather than argv, so
  secrets such as the one in ``AIS_TARGET_URL`` do not show up in ``ps``.

Docker is supported as a fallback when its daemon answers (not verified on
this project's machines, which have no Docker engine). Docker has no
slirp4netns: it uses its bridge network with ``--add-host
host.docker.internal:host-gateway``, so a host server reached from a container
must listen on an address the bridge can reach, not only on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "NO_ENGINE_MESSAGE",
    "ContainerEngine",
    "ContainerEngineError",
    "ContainerNotFoundError",
    "ExitInfo",
    "ImageNotFoundError",
    "detect_engine",
]

log = logging.getLogger(__name__)

NO_ENGINE_MESSAGE = (
    "init ETLs need a container engine (podman or docker); "
    "install podman (hack/container-setup.sh) or use `build`"
)

#: Limits inside a container; clamped to the hard limits of this process.
DEFAULT_ULIMITS: dict[str, int] = {"nofile": 1024, "nproc": 1024}

_RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC}
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_ENV_NAME_RE = re.compile(r"^[^=]+$")
_ENV_FILE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_FOUND_RE = re.compile(r"no such container|no container with|no such object", re.I)
_NAME_IN_USE_RE = re.compile(r"already in use|is already in use|conflict", re.I)
_NO_IMAGE_RE = re.compile(
    r"image not known|unable to find image|no such image|image .* not found|"
    r"pull policy .* never",
    re.I,
)


class ContainerEngineError(Exception):
    """An engine command failed; carries the engine's stderr."""

    def __init__(
        self,
        message: str,
        *,
        stderr: str = "",
        argv: Sequence[str] = (),
        returncode: int | None = None,
    ) -> None:
        self.stderr = stderr.strip()
        self.argv = list(argv)
        self.returncode = returncode
        super().__init__(f"{message}: {self.stderr}" if self.stderr else message)


class ImageNotFoundError(ContainerEngineError):
    """The image is not present locally (images are never pulled)."""

    def __init__(
        self,
        image: str,
        *,
        stderr: str = "",
        argv: Sequence[str] = (),
        returncode: int | None = None,
    ) -> None:
        self.image = image
        super().__init__(
            f"container image {image!r} is not present locally and is never pulled "
            "(build or load it first, e.g. hack/build-seed-image.sh)",
            stderr=stderr,
            argv=argv,
            returncode=returncode,
        )


class ContainerNotFoundError(ContainerEngineError):
    """No container with that id or name (never created, or already removed)."""


@dataclass(frozen=True)
class ExitInfo:
    """State of a container, as its engine reports it."""

    status: str  # created | running | exited | stopped | paused | ...
    running: bool
    exit_code: int | None  # None while it has not exited
    error: str  # the engine's or runtime's error, "" when none
    oom_killed: bool
    started_at: str
    finished_at: str


def _clamped_ulimits() -> dict[str, int]:
    out = {}
    for name, want in DEFAULT_ULIMITS.items():
        _soft, hard = resource.getrlimit(_RLIMITS[name])
        out[name] = want if hard == resource.RLIM_INFINITY else min(want, hard)
    return out


def _default_global_flags(kind: str) -> list[str]:
    if kind != "podman":
        return []
    flags: list[str] = []
    runtime = os.environ.get("AISETL_OCI_RUNTIME") or ("runc" if shutil.which("runc") else "")
    if runtime:
        flags += ["--runtime", runtime]
    # sd_booted(): systemd manages cgroups only when it runs as init.
    if not os.path.isdir("/run/systemd/system"):
        flags += ["--cgroup-manager", "cgroupfs"]
    return flags


class ContainerEngine:
    """One container engine CLI (podman or docker) and the flags we run it with."""

    def __init__(
        self,
        kind: str = "podman",
        *,
        binary: str | None = None,
        global_flags: Sequence[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        if kind not in ("podman", "docker"):
            raise ValueError(f"unknown container engine {kind!r}: want podman or docker")
        self.kind = kind
        self.binary = binary or kind
        self.global_flags = (
            list(global_flags) if global_flags is not None else _default_global_flags(kind)
        )
        self.timeout = timeout
        self.ulimits = _clamped_ulimits()

    def __repr__(self) -> str:
        return f"ContainerEngine({self.kind!r}, binary={self.binary!r})"

    @property
    def host_loopback_address(self) -> str:
        """The address a container uses to reach 127.0.0.1 of the host."""
        return "10.0.2.2" if self.kind == "podman" else "host.docker.internal"

    # -- running the CLI -------------------------------------------------------------

    async def _exec(
        self, *args: str, limit: float | None = None, merge_stderr: bool = False
    ) -> tuple[int, str, str]:
        argv = [self.binary, *self.global_flags, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise ContainerEngineError(
                f"cannot execute {self.binary}", stderr=str(e), argv=argv
            ) from e
        if limit is None:
            limit = self.timeout
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit)
        except (TimeoutError, asyncio.CancelledError) as e:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ContainerEngineError(
                f"{self.kind} did not answer within {limit:g} s", argv=argv
            ) from e
        rc = proc.returncode if proc.returncode is not None else -1
        return (
            rc,
            out.decode(errors="replace") if out else "",
            err.decode(errors="replace") if err else "",
        )

    async def _check(self, *args: str, what: str, limit: float | None = None) -> str:
        rc, out, err = await self._exec(*args, limit=limit)
        if rc != 0:
            cls = ContainerNotFoundError if _NOT_FOUND_RE.search(err) else ContainerEngineError
            raise cls(
                f"{self.kind} {what} failed (exit {rc})",
                stderr=err,
                returncode=rc,
                argv=[self.binary, *self.global_flags, *args],
            )
        return out

    async def probe(self) -> str:
        """Check that the engine works; return its version. Raises ContainerEngineError."""
        if self.kind == "podman":
            out = await self._check(
                "info", "--format", "{{.Version.Version}}", what="info", limit=30
            )
        else:
            out = await self._check("info", "--format", "{{.ServerVersion}}", what="info", limit=15)
        return out.strip()

    # -- the API -------------------------------------------------------------------

    async def image_exists(self, image: str) -> bool:
        if self.kind == "podman":
            rc, _, _ = await self._exec("image", "exists", image)
        else:
            rc, _, _ = await self._exec("image", "inspect", "--format", "{{.Id}}", image)
        return rc == 0

    async def run(
        self,
        *,
        name: str,
        image: str,
        command: list[str] | None,
        args: list[str] | None,
        env: dict[str, str],
        host_port: int,
        container_port: int,
        labels: dict[str, str],
        auto_remove: bool = False,
    ) -> str:
        """Start a detached container; return its id.

        ``command``/``args`` have Kubernetes semantics: ``command`` replaces the
        image's ENTRYPOINT (and drops its CMD), ``args`` replaces its CMD. The
        container's ``container_port`` is published on 127.0.0.1:``host_port``.
        Raises :class:`ImageNotFoundError` when the image is not present locally,
        :class:`ContainerEngineError` for any other failure (name in use, ...);
        a start that failed leaves no container behind. If the call is
        cancelled, a container by that name may still appear: remove(name).
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid container name {name!r}: want [a-zA-Z0-9][a-zA-Z0-9_.-]*")
        if not image:
            raise ValueError("image is required")
        for p in (host_port, container_port):
            if not 0 < p < 65536:
                raise ValueError(f"invalid port {p}")

        argv = ["run", "--detach", "--pull=never", "--name", name]
        if auto_remove:
            argv.append("--rm")
        if self.kind == "podman":
            argv += [
                "--network",
                "slirp4netns:allow_host_loopback=true",
                "--log-driver",
                "k8s-file",
                "--log-opt",
                "max-size=10mb",
            ]
        else:
            argv += ["--add-host", "host.docker.internal:host-gateway"]
        argv += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
        for resource_name, n in self.ulimits.items():
            argv += ["--ulimit", f"{resource_name}={n}:{n}"]
        for label, label_value in labels.items():
            argv += ["--label", f"{label}={label_value}"]

        # Environment: ordinary names with single-line values go through a private
        # env file (kept out of argv and so out of `ps`); anything an env file
        # cannot carry (a newline in the value, a name starting with "#") is
        # passed with -e.
        file_env: dict[str, str] = {}
        for key, value in env.items():
            if not _ENV_NAME_RE.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\n" in value or "\r" in value or not _ENV_FILE_NAME_RE.match(key):
                argv += ["--env", f"{key}={value}"]
            else:
                file_env[key] = value

        command = list(command or [])
        tail = list(args) if args else []
        if command:
            argv += ["--entrypoint", command[0]]
            tail = command[1:] + tail

        env_file = await asyncio.to_thread(_write_env_file, file_env) if file_env else None
        try:
            if env_file:
                argv += ["--env-file", env_file]
            argv += ["--", image, *tail] if self.kind == "podman" else [image, *tail]
            rc, out, err = await self._exec(*argv)
        finally:
            if env_file:
                await asyncio.to_thread(_unlink, env_file)
        if rc != 0:
            full = [self.binary, *self.global_flags, *argv]
            if not _NAME_IN_USE_RE.search(err):
                # A start that failed in the runtime leaves a "created" container
                # that holds the name: remove it so a retry can use the name.
                with contextlib.suppress(ContainerEngineError):
                    await self.remove(name)
            if _NO_IMAGE_RE.search(err) or not await self.image_exists(image):
                raise ImageNotFoundError(image, stderr=err, argv=full, returncode=rc)
            raise ContainerEngineError(
                f"{self.kind} run of {image} as {name} failed (exit {rc})",
                stderr=err,
                argv=full,
                returncode=rc,
            )
        cid = out.strip().splitlines()[-1] if out.strip() else ""
        if not cid:
            raise ContainerEngineError(f"{self.kind} run printed no container id", stderr=err)
        return cid

    async def inspect(self, container: str) -> dict[str, object] | None:
        """The engine's inspect document of a container, or None if it is gone."""
        rc, out, err = await self._exec("container", "inspect", container)
        if rc != 0:
            if _NOT_FOUND_RE.search(err):
                return None
            raise ContainerEngineError(
                f"{self.kind} inspect {container} failed (exit {rc})", stderr=err, returncode=rc
            )
        docs = json.loads(out or "[]")
        return docs[0] if docs else None

    async def exit_info(self, container: str) -> ExitInfo | None:
        """How the container is doing or how it ended; None if it no longer exists."""
        doc = await self.inspect(container)
        if doc is None:
            return None
        state = doc.get("State") or {}
        assert isinstance(state, dict)
        status = str(state.get("Status", "")).lower()
        running = bool(state.get("Running", False))
        exited = not running and status in ("exited", "stopped", "dead")
        code = state.get("ExitCode")
        return ExitInfo(
            status=status,
            running=running,
            exit_code=int(code) if exited and isinstance(code, int) else None,
            error=str(state.get("Error") or ""),
            oom_killed=bool(state.get("OOMKilled", False)),
            started_at=str(state.get("StartedAt") or ""),
            finished_at=str(state.get("FinishedAt") or "") if exited else "",
        )

    async def is_running(self, container: str) -> bool:
        info = await self.exit_info(container)
        return bool(info and info.running)

    async def logs(self, container: str, tail: int = 50) -> str:
        """The last ``tail`` lines of the container's stdout and stderr, interleaved.

        Raises :class:`ContainerNotFoundError` when the container is gone.
        """
        args = ["logs", "--tail", str(int(tail)), container]
        rc, out, _ = await self._exec(*args, merge_stderr=True)
        if rc != 0:
            cls = ContainerNotFoundError if _NOT_FOUND_RE.search(out) else ContainerEngineError
            raise cls(f"{self.kind} logs {container} failed (exit {rc})", stderr=out, returncode=rc)
        return out

    async def remove(self, container: str, *, grace: int = 0) -> None:
        """Stop (SIGTERM, SIGKILL after ``grace`` seconds) and remove; fine if gone."""
        if self.kind == "podman":
            args = ["rm", "--force", "--time", str(int(grace)), container]
        else:
            if grace > 0:
                await self._exec(
                    "stop", "--time", str(int(grace)), container, limit=self.timeout + grace
                )
            args = ["rm", "--force", container]
        rc, _, err = await self._exec(*args, limit=self.timeout + grace)
        if rc != 0 and not _NOT_FOUND_RE.search(err):
            raise ContainerEngineError(
                f"{self.kind} rm {container} failed (exit {rc})", stderr=err, returncode=rc
            )

    async def list_labelled(self, label_key: str, label_value: str) -> list[str]:
        """Ids of all containers (running or not) carrying label_key=label_value."""
        out = await self._check(
            "ps",
            "--all",
            "--no-trunc",
            "--quiet",
            "--filter",
            f"label={label_key}={label_value}",
            what="ps",
        )
        return [line.strip() for line in out.splitlines() if line.strip()]

    async def remove_labelled(self, label_key: str, label_value: str) -> list[str]:
        """Remove every container carrying label_key=label_value; return their ids."""
        ids = await self.list_labelled(label_key, label_value)
        for cid in ids:
            await self.remove(cid)
        return ids


def _write_env_file(env: dict[str, str]) -> str:
    fd, path = tempfile.mkstemp(prefix="aisetl-env-", suffix=".env")
    with os.fdopen(fd, "w", encoding="utf-8") as f:  # mkstemp: mode 0600
        for key, value in env.items():
            f.write(f"{key}={value}\n")
    return path


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def detect_engine(preferred: str | None = None) -> ContainerEngine | None:
    """The first container engine that works here: podman, then docker (if its
    daemon answers). ``preferred`` ("podman" or "docker") tries only that one.
    None when none works; callers raise an error with :data:`NO_ENGINE_MESSAGE`.
    """
    kinds = [preferred] if preferred else ["podman", "docker"]
    for kind in kinds:
        if kind not in ("podman", "docker"):
            raise ValueError(f"unknown container engine {kind!r}: want podman or docker")
        binary = shutil.which(kind)
        if not binary:
            continue
        engine = ContainerEngine(kind, binary=binary)
        try:
            version = await engine.probe()
        except ContainerEngineError as e:
            log.debug("container engine %s does not work: %s", kind, e)
            continue
        log.debug("container engine: %s %s", kind, version)
        return engine
    return None
