"""Transformers as pods pinned to the target's node.

One pod per (ETL, target), created by the target that needs it:

- ``spec.nodeName`` = the target's node (``K8S_HOST_NAME``): the transformer
  runs next to the data, and no scheduler decision can move it elsewhere.
- labels ``app.kubernetes.io/{part-of,component,instance}`` (the chart's
  NetworkPolicy selects on them) and ``aisetl.io/{etl-id,node,target,comm-type}``.
- an ownerReference to the ETL's ConfigMap (uid read with a GET just before),
  so deleting the declaration garbage-collects every transformer of it even
  when no target is there to stop it.
- ``restartPolicy: Never``: the target's reconciler restarts a transformer that
  ended, with backoff, and counts restarts; a kubelet restarting it in place
  would hide the crash from it.
- a readiness probe when the spec has none: ``GET /health`` for build
  runtimes, a TCP connect to the ``containerPort`` for init specs. The pod's
  Ready condition (the kubelet's probe) is what ``wait_ready`` waits for; the
  transformer is then addressed as ``http://<podIP>:<containerPort>``.
- ``AIS_TARGET_URL`` = ``<target advertise URL>/v1/etl/objects/<secret>``.

Build runtimes run the runtime image (``AISETL_RUNTIME_IMAGE_PYTHON3`` /
``..._PYTHON2``) with the ETL's ConfigMap mounted at ``/etc/aisetl/etl``
(``code.py``, ``deps.txt``); a non-empty dependency list is installed by an
init container (``pip install --target /deps``) into an emptyDir that the
server sees through ``PYTHONPATH=/deps``. Runtime pods run restricted: non-root
user 65532, no privilege escalation, all capabilities dropped, read-only root
filesystem, RuntimeDefault seccomp, no service account token. Init specs run as
the user wrote them, plus the settings above.

``wait_ready(timeout)`` enforces ``wait_timeout``: when it passes, the pod is
deleted and the error says why, from the pod's conditions, container states
and events (FailedScheduling, ErrImagePull, ...). Pods are followed by one
informer (list + watch) per orchestrator, not polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
import yaml

from aisetl.kube.client import Informer, Kube, KubeError, Obj, dns_name, label_value
from aisetl.model.errors import EtlFailed, EtlTimeout
from aisetl.model.etl import PART_OF, EtlDeclaration, comm_type_label, document_name
from aisetl.orchestrator.base import Orchestrator, Transformer, TransformerContext, tail_lines

log = structlog.get_logger("orchestrator.kubernetes")

INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
ETL_ID = "aisetl.io/etl-id"
NODE = "aisetl.io/node"
TARGET = "aisetl.io/target"
COMM_TYPE = "aisetl.io/comm-type"
CODE_DIR = "/etc/aisetl/etl"
DEPS_DIR = "/deps"
RUNTIME_SERVER = "/runtime/server.py"
CONTAINER = "transformer"


@dataclass
class KubernetesOrchestratorSettings:
    """Where and how transformer pods run."""

    release: str = "aisetl"
    """Helm release: the ``app.kubernetes.io/instance`` label of the pods."""
    node: str = ""
    """This target's node (K8S_HOST_NAME): every pod is pinned to it."""
    runtime_images: dict[str, str] = field(default_factory=lambda: {
        "python3": "aisetl/runtime-python3:latest", "python2": "aisetl/runtime-python2:latest"})
    """Image per build runtime (AISETL_RUNTIME_IMAGE_PYTHON3 / _PYTHON2)."""
    runtime_port: int = 8000
    """Port the runtime server listens on in build pods (its containerPort)."""
    runtime_user: int = 65532
    """Non-root UID/GID of build runtime pods."""
    delete_grace_seconds: int = 5
    """Grace period when a transformer pod is deleted."""
    image_pull_policy: str = "IfNotPresent"


def _is_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _restricted_container() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") != name]
    container["env"] = [*env, {"name": name, "value": value}]


def describe_pod(pod: Obj | None, events: list[Obj]) -> str:
    """Why a pod is not ready, for a person: conditions, container states, events."""
    if pod is None:
        return "the pod is gone"
    st = pod.get("status") or {}
    parts = [f"phase {st.get('phase', 'Pending')}"]
    for c in st.get("conditions") or []:
        if c.get("status") != "True" and (c.get("reason") or c.get("message")):
            parts.append(f"{c.get('type')}: {c.get('reason', '')} {c.get('message', '')}".strip())
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        for state, d in (cs.get("state") or {}).items():
            if state == "running":
                continue
            what = d.get("reason", state)
            if "exitCode" in d:
                what += f" (exit code {d['exitCode']})"
            if d.get("message"):
                what += f": {d['message']}"
            parts.append(f"container {cs.get('name')}: {what}")
    for ev in events[-5:]:
        parts.append(f"event {ev.get('reason')}: {ev.get('message', '')}".strip())
    if len(parts) == 1:
        node = (pod.get("spec") or {}).get("nodeName")
        parts.append(f"no container has started: is the kubelet of node {node!r} up?")
    return "; ".join(parts)


def _exit_reason(pod: Obj) -> str | None:
    """How the pod ended, or None while it has not."""
    if pod["metadata"].get("deletionTimestamp"):
        return "the pod is being deleted"
    st = pod.get("status") or {}
    if st.get("phase") not in ("Failed", "Succeeded"):
        return None
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            why = f"exit code {term.get('exitCode')}"
            if term.get("reason"):
                why += f" ({term['reason']})"
            return why
    return f"pod {st.get('phase')}" + (f" ({st['reason']})" if st.get("reason") else "")


class PodTransformer(Transformer):
    """One transformer pod, followed through the orchestrator's informer."""

    def __init__(self, orch: KubernetesOrchestrator, etl_id: str, pod_name: str,
                 port: int) -> None:
        self.orch = orch
        self.etl_id = etl_id
        self.pod_name = pod_name
        self.port = port
        self._seen = False
        self._stopped = False

    def _pod(self) -> Obj | None:
        pod = self.orch.pods(self.pod_name)
        if pod is not None:
            self._seen = True
        return pod

    def _ended(self, pod: Obj | None) -> str | None:
        if pod is None:
            return "the pod was deleted" if self._seen else None
        return _exit_reason(pod)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pod = self._pod()
            ended = self._ended(pod)
            if ended:
                why = describe_pod(pod, await self.orch.pod_events(self.pod_name))
                raise EtlFailed(f"transformer pod {self.pod_name} ended before it was ready "
                                f"({ended}): {why}", etl=self.etl_id)
            ip = ((pod or {}).get("status") or {}).get("podIP")
            if pod is not None and ip and _is_ready(pod):
                host = f"[{ip}]" if ":" in ip else ip
                self.endpoint = self.public_endpoint = f"http://{host}:{self.port}"
                return
            left = deadline - time.monotonic()
            if left <= 0:
                why = describe_pod(pod, await self.orch.pod_events(self.pod_name))
                await self.stop()
                raise EtlTimeout(f"transformer pod {self.pod_name} was not ready within "
                                 f"{timeout:g}s (wait_timeout), so it was deleted: {why}",
                                 etl=self.etl_id)
            await self.orch.changed(min(left, 2.0))

    async def wait_exit(self) -> str:
        while True:
            ended = self._ended(self._pod())
            if ended:
                return ended
            await self.orch.changed(5.0)

    async def logs(self, tail: int = 50) -> str:
        try:
            text = await asyncio.to_thread(
                self.orch.kube.request_text, self.orch.kube.path("pods", self.pod_name) + "/log",
                {"tailLines": tail, "container": CONTAINER})
        except KubeError as e:
            return f"(no logs of pod {self.pod_name}: {e.message})"
        return tail_lines(text, tail)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.orch.delete_pod(self.pod_name)


class KubernetesOrchestrator(Orchestrator):
    def __init__(self, kube: Kube, settings: KubernetesOrchestratorSettings,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.session = session
        self._informer: Informer | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_environment(cls, session: aiohttp.ClientSession | None = None
                         ) -> KubernetesOrchestrator:
        env = os.environ.get
        s = KubernetesOrchestratorSettings(release=env("AISETL_RELEASE", "aisetl"),
                                           node=env("K8S_HOST_NAME", ""))
        for runtime in list(s.runtime_images):
            image = env(f"AISETL_RUNTIME_IMAGE_{runtime.upper()}")
            if image:
                s.runtime_images[runtime] = image
        if env("AISETL_RUNTIME_PORT"):
            s.runtime_port = int(env("AISETL_RUNTIME_PORT", "8000"))
        return cls(Kube.from_environment(env("POD_NAMESPACE")), s, session)

    # --- the informer and its wakeups ---------------------------------------------------------
    def _selector(self) -> str:
        return (f"{COMPONENT}=transformer,{INSTANCE}={label_value(self.settings.release)},"
                f"{NODE}={label_value(self.settings.node)}")

    def _ensure_watching(self, ctx: TransformerContext) -> None:
        if not self.settings.node:
            self.settings.node = ctx.node
        if self._informer is None:
            self._loop = asyncio.get_running_loop()
            self._informer = Informer(self.kube, "pods", self._selector(),
                                      lambda _t, _o, _n: self._wake_threadsafe(),
                                      self._wake_threadsafe, name="transformers").start()

    def _wake_threadsafe(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def changed(self, timeout: float) -> None:
        """Sleep until a transformer pod changes, or ``timeout`` passes."""
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(f)
        try:
            # not wait_for: on Python 3.11 it swallows a cancel that arrives together
            # with the wakeup (a stopped ETL whose pod the GC deletes at that moment),
            # and the cancelled supervisor would then restart the transformer forever
            await asyncio.wait({f}, timeout=timeout)
        finally:
            self._waiters.discard(f)

    def pods(self, name: str) -> Obj | None:
        return self._informer.cache.get(name) if self._informer is not None else None

    async def pod_events(self, name: str) -> list[Obj]:
        try:
            doc = await self.kube.call("GET", self.kube.path("events"), query={
                "fieldSelector": f"involvedObject.kind=Pod,involvedObject.name={name}"})
        except KubeError:
            return []
        items: list[Obj] = doc.get("items") or []
        return sorted(items, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime")))

    async def delete_pod(self, name: str) -> None:
        try:
            await self.kube.call("DELETE", self.kube.path("pods", name), body={
                "gracePeriodSeconds": self.settings.delete_grace_seconds,
                "propagationPolicy": "Background"})
        except KubeError as e:
            if e.status != 404:
                log.warning("could not delete transformer pod", pod=name, error=str(e))

    # --- pods ------------------------------------------------------------------------------
    def pod_manifest(self, decl: EtlDeclaration, ctx: TransformerContext,
                     owner: Obj) -> tuple[Obj, int]:
        """The pod for ``decl`` on this target, and the port it serves on."""
        s = self.settings
        node = s.node
        labels = {PART_OF: "aisetl", COMPONENT: "transformer",
                  INSTANCE: label_value(s.release), ETL_ID: label_value(decl.id),
                  NODE: label_value(node), TARGET: label_value(ctx.target_id),
                  COMM_TYPE: comm_type_label(decl.comm_type)}
        digest = hashlib.sha256(ctx.target_id.encode()).hexdigest()[:6]
        name = f"aisetl-{dns_name(decl.id, 36)}-{digest}-{secrets.token_hex(3)}"
        meta = owner["metadata"]
        owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"],
                     "uid": meta["uid"], "blockOwnerDeletion": True, "controller": False}
        if decl.kind == "build":
            pod, port = self._build_pod(decl, meta["name"])
        else:
            pod, port = self._init_pod(decl)
        pod["metadata"]["name"] = name
        pod["metadata"]["labels"] = {**(pod["metadata"].get("labels") or {}), **labels}
        pod["metadata"]["ownerReferences"] = [owner_ref]
        spec = pod["spec"]
        spec["nodeName"] = node
        spec["restartPolicy"] = "Never"
        _set_env(spec["containers"][0], "AIS_TARGET_URL", ctx.ais_target_url())
        _set_env(spec["containers"][0], "AISETL_ETL_ID", decl.id)
        return pod, port

    def _build_pod(self, decl: EtlDeclaration, configmap: str) -> tuple[Obj, int]:
        s = self.settings
        image = s.runtime_images.get(decl.runtime)
        if not image:
            raise EtlFailed(f"runtime {decl.runtime!r} has no image: set "
                            f"AISETL_RUNTIME_IMAGE_{decl.runtime.upper()}", etl=decl.id)
        port = s.runtime_port
        mounts = [{"name": "code", "mountPath": CODE_DIR, "readOnly": True},
                  {"name": "tmp", "mountPath": "/tmp"}]
        volumes: list[Obj] = [
            {"name": "code", "configMap": {"name": configmap, "items": [
                {"key": "code.py", "path": "code.py"}, {"key": "deps.txt", "path": "deps.txt"}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
        container: Obj = {
            "name": CONTAINER, "image": image, "imagePullPolicy": s.image_pull_policy,
            "command": ["python", RUNTIME_SERVER, "--code", f"{CODE_DIR}/code.py",
                        "--listen", "0.0.0.0", "--port", str(port)],
            "ports": [{"name": "default", "containerPort": port, "protocol": "TCP"}],
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": port},
                               "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 3},
            "securityContext": _restricted_container(),
            "volumeMounts": mounts,
        }
        init: list[Obj] = []
        if any(line.strip() and not line.strip().startswith("#")
               for line in decl.deps.splitlines()):
            volumes.append({"name": "deps", "emptyDir": {"sizeLimit": "2Gi"}})
            dep_mounts = [*mounts, {"name": "deps", "mountPath": DEPS_DIR}]
            container["volumeMounts"] = [*mounts, {"name": "deps", "mountPath": DEPS_DIR,
                                                   "readOnly": True}]
            _set_env(container, "PYTHONPATH", DEPS_DIR)
            init.append({
                "name": "install-deps", "image": image, "imagePullPolicy": s.image_pull_policy,
                "command": ["python", "-m", "pip", "install", "--no-cache-dir", "--no-input",
                            "--disable-pip-version-check", "--target", DEPS_DIR,
                            "-r", f"{CODE_DIR}/deps.txt"],
                "env": [{"name": "HOME", "value": "/tmp"}],
                "securityContext": _restricted_container(),
                "volumeMounts": dep_mounts,
            })
        spec: Obj = {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": s.runtime_user,
                                "runAsGroup": s.runtime_user, "fsGroup": s.runtime_user,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        }
        if init:
            spec["initContainers"] = init
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": spec}, port

    def _init_pod(self, decl: EtlDeclaration) -> tuple[Obj, int]:
        doc = copy.deepcopy(yaml.safe_load(decl.spec))
        port = decl.container.port
        meta = doc.get("metadata") or {}
        pod: Obj = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"labels": dict(meta.get("labels") or {}),
                                 "annotations": dict(meta.get("annotations") or {})},
                    "spec": doc["spec"]}
        c = pod["spec"]["containers"][0]
        if not c.get("readinessProbe"):
            c["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 2,
                                   "timeoutSeconds": 2, "failureThreshold": 3}
        return pod, port

    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        self._ensure_watching(ctx)
        cm = document_name(decl.id)
        try:
            owner = await self.kube.call("GET", self.kube.path("configmaps", cm))
        except KubeError as e:
            raise EtlFailed(f"ETL ConfigMap {cm} unreadable ({e}): it was deleted, or the "
                            "target's Role lacks 'get configmaps'", etl=decl.id) from e
        pod, port = self.pod_manifest(decl, ctx, owner)
        try:
            await self.kube.call("POST", self.kube.path("pods"), body=pod)
        except KubeError as e:
            raise EtlFailed(f"transformer pod {pod['metadata']['name']} was refused by the "
                            f"API server: {e}", etl=decl.id) from e
        except BaseException:  # cancelled (ETL stopped) mid-call: the pod may exist
            with contextlib.suppress(Exception):
                await asyncio.shield(self.delete_pod(pod["metadata"]["name"]))
            raise
        log.info("transformer pod created", etl=decl.id, pod=pod["metadata"]["name"],
                 node=pod["spec"]["nodeName"])
        return PodTransformer(self, decl.id, pod["metadata"]["name"], port)

    async def cleanup_stale(self, ctx: TransformerContext) -> None:
        """Delete transformer pods of this release on this node: a target runs per node,
        and at start it runs none, so any such pod is left from a previous run."""
        self._ensure_watching(ctx)
        try:
            doc = await self.kube.call("GET", self.kube.path("pods"),
                                       query={"labelSelector": self._selector()})
        except KubeError as e:
            log.warning("could not list stale transformer pods", error=str(e))
            return
        for pod in doc.get("items") or []:
            name = pod["metadata"]["name"]
            log.info("deleting stale transformer pod", pod=name)
            await self.delete_pod(name)

    async def close(self) -> None:
        if self._informer is not None:
            informer, self._informer = self._informer, None
            await asyncio.to_thread(informer.stop)
        await asyncio.to_thread(self.kube.close)
