"""A real, kubelet-less Kubernetes control plane for the tests in this folder.

``apiserver`` (session): etcd + kube-apiserver + kube-controller-manager
(garbage collector, namespace and serviceaccount controllers) on 127.0.0.1,
started by ``hack/kube-apiserver-up.sh`` in a temporary directory from the
binaries that ``hack/k8s-binaries.sh`` builds and caches outside the repo (the
fixture runs that script when they are missing: ~7 minutes the first time).
RBAC is enforced, so a ServiceAccount's token only gets what its Role gives.

Nothing runs a kubelet or a scheduler: pods stay Pending unless a test plays
the kubelet's part (``Kubelet`` below): it patches a pod's status (podIP,
phase, Ready condition) and posts the events a kubelet would. Where a
transformer must really answer, the test runs the python3 runtime server on a
free loopback port, and the pod "gets" podIP 127.0.0.1 with the orchestrator's
runtime port set to that free port, so the target addresses the real server.

``daemonset_controller`` (per test): a second kube-controller-manager with only
the DaemonSet controller, on the same API server, for the test that wants real
DaemonSet rollouts (``controller_manager`` starts one for any controller list).

``ns`` (per test): a fresh namespace with its ``default`` ServiceAccount, and an
admin ``Kube`` for it; deleted after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from aisetl.kube.client import Kube, KubeError, Obj
from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AISETL_CACHE", Path.home() / ".cache" / "aisetl"))


def tool(name: str) -> str | None:
    cached = CACHE / "bin" / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which(name)


@dataclass
class ControlPlane:
    dir: Path
    env: dict[str, str]
    kubectl_bin: str
    start_seconds: float
    restarted: list[tuple[subprocess.Popen[bytes], Any]] = field(default_factory=list)

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    def kube(self, namespace: str) -> Kube:
        return Kube.from_kubeconfig(self.kubeconfig, namespace)

    def kubectl(self, *args: str, kubeconfig: str | None = None, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", kubeconfig or self.kubeconfig,
                               *args], input=stdin, capture_output=True, text=True,
                              timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def _pid(self, name: str) -> int:
        for line in (self.dir / "pids").read_text().splitlines():
            n, pid = line.split()
            if n == name:
                return int(pid)
        raise KeyError(name)

    def restart_apiserver(self, down_seconds: float = 1.0) -> None:
        """Kill the kube-apiserver process and start it again with the same
        arguments; etcd (and so every object) stays. SIGKILL: a crash, which
        breaks watches mid-stream (a SIGTERM drains for ~60 s first)."""
        pid = self._pid("kube-apiserver")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ")[1].startswith("Z"):
                        break
            except FileNotFoundError:
                break
            time.sleep(0.1)
        time.sleep(down_seconds)
        log = open(self.dir / "logs" / "kube-apiserver.log", "ab")  # closed at teardown
        proc = subprocess.Popen([a.decode() for a in argv], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.restarted.append((proc, log))
        lines = [ln for ln in (self.dir / "pids").read_text().splitlines()
                 if not ln.startswith("kube-apiserver ")]
        (self.dir / "pids").write_text("\n".join([*lines, f"kube-apiserver {proc.pid}"]) + "\n")
        self.wait_ready(60)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.kubectl("get", "--raw", "/readyz", check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"apiserver not ready after restart: {r.stderr}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    kubectl = tool("kubectl")
    require(kubectl is not None, "kubectl", "hack/install-tools.sh")
    require(shutil.which("openssl") is not None and shutil.which("curl") is not None,
            "openssl and curl", "apt-get install openssl curl")
    bin_dir = Path(subprocess.run([str(REPO / "hack/k8s-binaries.sh"), "--print-bin-dir"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    if not all((bin_dir / b).exists() for b in ("etcd", "kube-apiserver",
                                                 "kube-controller-manager")):
        # builds from the Go module proxy into the cache outside the repo (~7 min once)
        build = subprocess.run([str(REPO / "hack/k8s-binaries.sh")], capture_output=True,
                               text=True, timeout=3600, check=False)
        require(build.returncode == 0, f"kube-apiserver binaries ({build.stderr[-2000:]})",
                "hack/k8s-binaries.sh")
    d = tmp_path_factory.mktemp("apiserver")
    started = time.monotonic()
    up = subprocess.run([str(REPO / "hack/kube-apiserver-up.sh"), str(d)], capture_output=True,
                        text=True, timeout=180, check=False)
    assert up.returncode == 0, f"kube-apiserver-up.sh failed:\n{up.stderr}"
    env = {}
    for line in (d / "env").read_text().splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = v
    assert kubectl is not None
    cp = ControlPlane(d, env, kubectl, time.monotonic() - started)
    print(f"\ncontrol plane ready in {cp.start_seconds:.1f}s ({d})", file=sys.stderr)
    try:
        yield cp
    finally:
        # the apiserver drains for up to 60 s on SIGTERM; its data is throwaway
        with contextlib.suppress(KeyError, ProcessLookupError):
            os.kill(cp._pid("kube-apiserver"), signal.SIGKILL)
        for proc, _log in cp.restarted:
            proc.wait(30)  # reap it, or --stop waits 15 s for the zombie
        subprocess.run([str(REPO / "hack/kube-apiserver-up.sh"), "--stop", str(d)],
                       capture_output=True, timeout=120, check=False)
        for _proc, log in cp.restarted:
            log.close()


@contextlib.contextmanager
def controller_manager(cp: ControlPlane, controllers: str,
                       timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """A second kube-controller-manager on the shared API server running only
    ``controllers`` (e.g. ``daemonset``), for as long as the ``with`` block.

    The session's controller-manager runs the controllers every test needs
    (``AISETL_KCM_CONTROLLERS``); controllers that act on objects several tests
    create (a DaemonSet puts pods on every matching Node) run only inside the
    test that wants them. Same binary and credentials; stopped with SIGTERM
    (SIGKILL after 15 s)."""
    argv0 = Path(f"/proc/{cp._pid('kube-apiserver')}/cmdline").read_bytes().split(b"\0")[0]
    binary = Path(argv0.decode()).parent / "kube-controller-manager"
    require(binary.is_file(), "kube-controller-manager", "hack/k8s-binaries.sh")
    port = free_port()
    log_path = cp.dir / "logs" / f"kube-controller-manager-{controllers.replace(',', '-')}.log"
    cert_dir = cp.dir / f"kcm-{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([
            str(binary), "--kubeconfig", str(cp.dir / "pki" / "kcm.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(port),
            "--cert-dir", str(cert_dir), "--leader-elect=false", "--controllers", controllers,
            "--use-service-account-credentials=false", "--profiling=false", "--v", "1"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # its self-signed serving cert; loopback only
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"kube-controller-manager exited; see {log_path}"
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz",
                                            context=tls, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"kube-controller-manager not healthy: {log_path}"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


@pytest.fixture
def daemonset_controller(apiserver: ControlPlane) -> Iterator[subprocess.Popen[bytes]]:
    """The DaemonSet controller (real, from kube-controller-manager) for one test."""
    with controller_manager(apiserver, "daemonset") as proc:
        yield proc


@dataclass
class Namespace:
    name: str
    cp: ControlPlane
    kube: Kube


@pytest.fixture
def ns(apiserver: ControlPlane) -> Iterator[Namespace]:
    name = f"t-{secrets.token_hex(4)}"
    admin = apiserver.kube(name)
    admin.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while True:  # pods need the namespace's "default" ServiceAccount (admission)
        try:
            admin.request("GET", admin.path("serviceaccounts", "default"))
            break
        except KubeError:
            assert time.monotonic() < deadline, "no default ServiceAccount after 30s"
            time.sleep(0.1)
    try:
        yield Namespace(name, apiserver, admin)
    finally:
        try:
            admin.request("DELETE", f"/api/v1/namespaces/{name}")
        except KubeError:
            pass
        admin.close()


class Kubelet:
    """Plays the kubelet's part for pods of one namespace: statuses and events."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def status(self, pod: str, status: dict[str, Any]) -> Obj:
        return self.kube.request("PATCH", self.kube.path("pods", pod) + "/status",
                                 body={"status": status},
                                 content_type="application/merge-patch+json")

    def run(self, pod: str, ip: str = "127.0.0.1", ready: bool = True) -> Obj:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cond = "True" if ready else "False"
        return self.status(pod, {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
            "startTime": now,
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now}
                           for t, s in (("PodScheduled", "True"), ("Initialized", "True"),
                                        ("ContainersReady", cond), ("Ready", cond))]})

    def image_pull_fails(self, pod: str, message: str) -> None:
        self.status(pod, {"phase": "Pending", "containerStatuses": [{
            "name": "transformer", "ready": False, "restartCount": 0, "image": "x",
            "imageID": "", "state": {"waiting": {"reason": "ErrImagePull",
                                                 "message": message}}}]})
        self.event(pod, "Failed", f"Failed to pull image: {message}", "Warning")

    def event(self, pod: str, reason: str, message: str, type_: str = "Normal") -> None:
        p = self.kube.request("GET", self.kube.path("pods", pod))
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.kube.request("POST", self.kube.path("events"), body={
            "metadata": {"name": f"{pod}.{secrets.token_hex(6)}"},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": self.kube.namespace,
                               "uid": p["metadata"]["uid"], "apiVersion": "v1"},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": "kubelet", "host": p["spec"].get("nodeName", "")},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1})


@pytest.fixture
def kubelet(ns: Namespace) -> Kubelet:
    return Kubelet(ns.kube)


@pytest.fixture(scope="session")
def helm() -> str:
    path = tool("helm")
    require(path is not None, "helm", "hack/install-tools.sh")
    assert path is not None
    return path


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(argv[:3])} failed:\n{proc.stderr}"
    return proc.stdout


def kubeconfig_for(ns: Namespace, sa: str, path: Path) -> Path:
    """A kubeconfig whose user is ServiceAccount ``sa`` of ``ns`` (a 1 h token)."""
    token = ns.cp.kubectl("-n", ns.name, "create", "token", sa, "--duration", "1h").stdout
    admin = yaml.safe_load(Path(ns.cp.kubeconfig).read_text())
    admin["users"] = [{"name": sa, "user": {"token": token.strip()}}]
    admin["contexts"][0]["context"] = {"cluster": "aisetl", "user": sa, "namespace": ns.name}
    path.write_text(yaml.safe_dump(admin))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RuntimeServers:
    """``runtimes/python3/server.py`` processes on loopback, standing in for transformer
    containers (no kubelet runs them): ``await servers(code, target_url, port=None)``
    starts one and returns its port; ``await servers.stop(port)`` ends it, as a
    kubelet ends the container of a deleted pod."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    async def __call__(self, code: str, target_url: str = "", port: int | None = None) -> int:
        port = port or free_port()
        path = self.tmp_path / f"code-{port}.py"
        path.write_text(code)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "runtimes/python3/server.py"), "--code", str(path),
            "--listen", "127.0.0.1", "--port", str(port), "--workers", "1",
            env={**os.environ, "AIS_TARGET_URL": target_url}, start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.procs[port] = proc
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            return port
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("runtime server did not come up")

    async def stop(self, port: int) -> None:
        p = self.procs.pop(port)
        if p.returncode is None:
            os.killpg(p.pid, signal.SIGTERM)
            await p.wait()


@pytest.fixture
async def runtime_server(tmp_path: Path) -> AsyncIterator[RuntimeServers]:
    """Start ``runtimes/python3/server.py`` with given code on a loopback port."""
    servers = RuntimeServers(tmp_path)
    yield servers
    for port in list(servers.procs):
        await servers.stop(port)


async def eventually(fn: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``fn`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
