"""The Kubernetes control store: records as ConfigMaps, membership from pods.

Everything lives in the release's namespace, in objects labelled
``app.kubernetes.io/part-of=aisetl`` and ``app.kubernetes.io/instance=<release>``:

    ConfigMap aisetl-etl-<id>              label aisetl.io/etl=true: an ETL declaration,
                                           exactly the document of model.etl.to_document,
                                           so ``kubectl apply`` of one works like the API
        annotation status.aisetl.io/<target>   that target's status of the ETL (JSON)
        Events on it                       each status change, for ``kubectl describe``
    ConfigMap aisetl-bucket-<name>-<hash>  label aisetl.io/bucket=true: a bucket record
    ConfigMap aisetl-xaction-<id>-<hash>   label aisetl.io/xaction=true: an offline job
    Pods instance=<release>,component=target   membership: the Ready ones

Why status as annotations on the declaration itself, not a ConfigMap per
(ETL, target): it dies with the declaration (``delete_etl`` removes status
with no extra calls, and the gateway's cleanup after a failed init cannot
leave orphans); a JSON merge patch of one annotation key never conflicts with
another target's patch, so no read-modify-write; and a patch to a deleted
declaration is a 404, which is exactly "stopped meanwhile: leave nothing".
The watch tells a status change (annotations) from a declaration change
(``data``), so status reports wake the gateway (ETL_STATUS) without making
every target reconcile (ETLS). ``kubectl apply`` leaves annotations it did not
set alone, so a GitOps re-apply does not wipe status.

ConfigMaps declared by hand may lack the instance label: declarations with no
``app.kubernetes.io/instance`` or with this release's are ours (one release per
namespace is the supported layout: ConfigMap names would collide otherwise).

Membership: Ready target pods of the release with a pod IP and no deletion
timestamp; ``url`` is ``http://<podIP>:<port>``, the port from the pod's
``aisetl.io/port`` annotation, else its container port named ``http``, else
8081. A target also counts itself as soon as its own pod has an IP (see
``heartbeat``): the chart's readiness probe asks the target whether it has
joined, and it could never join if joining required being Ready first.

Watching: one informer (list + watch, relist on 410, see ``kube.client``) per
collection, started by the first ``watch()``; every ``watch()`` gets the kinds
that changed, coalesced, and every kind after a broken watch was repaired.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from aisetl.control.base import (
    ALL_KINDS,
    BUCKETS,
    ETL_STATUS,
    ETLS,
    TARGETS,
    XACTIONS,
    ControlStore,
)
from aisetl.kube.client import Informer, Kube, KubeError, Obj, dns_name, label_value, strip
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import BucketExists, BucketNotFound, EtlExists, EtlNotFound, Unavailable
from aisetl.model.etl import ETL_LABEL, PART_OF, document_name
from aisetl.model.reconcile import FAILED, READY

log = structlog.get_logger("control.kubernetes")

INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
BUCKET_LABEL = "aisetl.io/bucket"
XACTION_LABEL = "aisetl.io/xaction"
STATUS_PREFIX = "status.aisetl.io/"
PORT_ANNOTATION = "aisetl.io/port"
DEFAULT_TARGET_PORT = 8081
EVENT_REASONS = {READY: "TransformerReady", FAILED: "TransformerFailed"}
_ANNOTATION_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def record_name(prefix: str, key: str) -> str:
    """A ConfigMap name for any bucket or job name: readable, and unique by digest."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{prefix}-{dns_name(key, 40)}-{digest}"


def status_key(target_id: str) -> str:
    name = target_id if _ANNOTATION_NAME.match(target_id) else \
        "t-" + hashlib.sha256(target_id.encode()).hexdigest()[:16]
    return STATUS_PREFIX + name


def _statuses(doc: Obj) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in ((doc.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith(STATUS_PREFIX):
            try:
                st = json.loads(value)
            except ValueError:
                continue
            if isinstance(st, dict):
                out[str(st.pop("target", key.removeprefix(STATUS_PREFIX)))] = st
    return out


def _is_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _target_port(pod: Obj) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    if str(ann.get(PORT_ANNOTATION, "")).isdigit():
        return int(ann[PORT_ANNOTATION])
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                return int(p["containerPort"])
    return DEFAULT_TARGET_PORT


def target_info(pod: Obj) -> TargetInfo:
    ip = (pod.get("status") or {}).get("podIP", "")
    return TargetInfo(id=pod["metadata"]["name"], url=f"http://{ip}:{_target_port(pod)}",
                      node=(pod.get("spec") or {}).get("nodeName", ""))


class _Subscriber:
    """One ``watch()`` call: kinds not yet yielded, and a wakeup in its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: set[str] = set(ALL_KINDS)
        self.wake = asyncio.Event()
        self.wake.set()

    def notify(self, kinds: set[str]) -> None:  # any thread
        def _set() -> None:
            self.pending |= kinds
            self.wake.set()

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # its loop is closed: nobody is listening any more
            pass


class KubernetesControlStore(ControlStore):
    def __init__(self, kube: Kube, release: str, *, node: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.release = release
        self.node = node
        self.clock = clock
        self.me: TargetInfo | None = None
        self._subscribers: set[_Subscriber] = set()
        self._informers: list[Informer] = []
        self._posted: dict[tuple[str, str], tuple[str, str]] = {}

    @classmethod
    def from_environment(cls) -> KubernetesControlStore:
        """POD_NAMESPACE, AISETL_RELEASE, K8S_HOST_NAME; in-cluster config or KUBECONFIG."""
        kube = Kube.from_environment(os.environ.get("POD_NAMESPACE"))
        release = os.environ.get("AISETL_RELEASE", "")
        if not release:
            raise SystemExit("aisetl: AISETL_RELEASE is not set: the chart sets it to the "
                             "release name; set it when running outside the chart")
        return cls(kube, release, node=os.environ.get("K8S_HOST_NAME", ""))

    def labels(self, **extra: str) -> dict[str, str]:
        return {PART_OF: "aisetl", INSTANCE: self.release, **extra}

    def _ours(self, obj: Obj) -> bool:
        inst = ((obj.get("metadata") or {}).get("labels") or {}).get(INSTANCE)
        return inst in (None, self.release)

    async def _call(self, method: str, path: str, **kw: Any) -> Obj:
        try:
            return await self.kube.call(method, path, **kw)
        except KubeError as e:
            if e.status == 0:
                raise Unavailable(f"Kubernetes API unreachable: {e.message}") from e
            raise

    # --- buckets -------------------------------------------------------------------------
    def _bucket_path(self, name: str) -> str:
        return self.kube.path("configmaps", record_name("aisetl-bucket", name))

    async def create_bucket(self, info: BucketInfo) -> None:
        body = {"metadata": {"name": record_name("aisetl-bucket", info.name),
                             "labels": self.labels(**{BUCKET_LABEL: "true"})},
                "data": {"name": info.name, "bucket.json": json.dumps(info.to_dict())}}
        try:
            await self._call("POST", self.kube.path("configmaps"), body=body)
        except KubeError as e:
            if e.status == 409:
                raise BucketExists(f"bucket {info.name!r} already exists",
                                   bucket=info.name) from e
            raise

    async def delete_bucket(self, name: str) -> None:
        try:
            await self._call("DELETE", self._bucket_path(name))
        except KubeError as e:
            if e.status == 404:
                raise BucketNotFound(f"bucket {name!r} does not exist", bucket=name) from e
            raise

    @staticmethod
    def _bucket(doc: Obj) -> BucketInfo | None:
        try:
            return BucketInfo.from_dict(json.loads((doc.get("data") or {})["bucket.json"]))
        except (KeyError, ValueError, TypeError):
            return None

    async def get_bucket(self, name: str) -> BucketInfo | None:
        try:
            doc = await self._call("GET", self._bucket_path(name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        b = self._bucket(doc)
        return b if b is not None and b.name == name else None

    async def list_buckets(self) -> list[BucketInfo]:
        docs = await self._list("configmaps", f"{BUCKET_LABEL}=true")
        found = (self._bucket(d) for d in docs)
        return sorted((b for b in found if b is not None), key=lambda b: b.name)

    # --- membership --------------------------------------------------------------------------
    async def heartbeat(self, target: TargetInfo) -> None:
        """Nothing to write (readiness is membership); remembers who "I" am."""
        self.me = target

    async def leave(self, target_id: str) -> None:
        """Nothing to write: a stopping pod stops being Ready."""

    def _target_selector(self) -> str:
        return f"{INSTANCE}={self.release},{COMPONENT}=target"

    async def live_targets(self) -> list[TargetInfo]:
        out = []
        for pod in await self._list("pods", self._target_selector()):
            meta, ip = pod["metadata"], (pod.get("status") or {}).get("podIP")
            if not ip or meta.get("deletionTimestamp"):
                continue
            if _is_ready(pod) or (self.me is not None and meta["name"] == self.me.id):
                out.append(target_info(pod))
        return sorted(out, key=lambda t: t.id)

    # --- ETL declarations ----------------------------------------------------------------------
    async def create_etl(self, doc: dict[str, Any]) -> None:
        etl_id = doc["data"]["id"]
        meta = dict(doc.get("metadata") or {})
        meta["name"] = document_name(etl_id)
        meta["labels"] = {**(meta.get("labels") or {}), **self.labels(**{ETL_LABEL: "true"})}
        meta.pop("namespace", None)
        body = {**doc, "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
        try:
            await self._call("POST", self.kube.path("configmaps"), body=body)
        except KubeError as e:
            if e.status == 409:
                raise EtlExists(f"ETL {etl_id!r} already exists: stop it first "
                                f"(ais etl stop {etl_id}) or choose another name",
                                etl=etl_id) from e
            raise

    async def _get_etl(self, etl_id: str) -> Obj | None:
        try:
            doc = await self._call("GET", self.kube.path("configmaps", document_name(etl_id)))
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        labels = (doc.get("metadata") or {}).get("labels") or {}
        if labels.get(ETL_LABEL) != "true" or not self._ours(doc):
            return None
        return strip(doc)

    async def delete_etl(self, etl_id: str) -> None:
        doc = await self._get_etl(etl_id)
        if doc is None or (doc.get("data") or {}).get("id") != etl_id:
            raise EtlNotFound(f"ETL {etl_id!r} does not exist (ais etl ls lists them)",
                              etl=etl_id)
        uid = doc["metadata"]["uid"]
        try:  # the uid precondition: never delete a newer declaration of the same ID
            await self._call("DELETE", self.kube.path("configmaps", doc["metadata"]["name"]),
                             body={"propagationPolicy": "Background",
                                   "preconditions": {"uid": uid}})
        except KubeError as e:
            if e.status not in (404, 409):
                raise
            raise EtlNotFound(f"ETL {etl_id!r} does not exist (ais etl ls lists them)",
                              etl=etl_id) from e

    async def _list(self, resource: str, selector: str) -> list[Obj]:
        doc = await self._call("GET", self.kube.path(resource),
                               query={"labelSelector": selector})
        return [strip(o) for o in doc.get("items") or []]

    async def list_etls(self) -> list[dict[str, Any]]:
        docs = await self._list("configmaps", f"{ETL_LABEL}=true")
        return sorted((d for d in docs if self._ours(d)), key=lambda d: d["metadata"]["name"])

    async def put_etl_status(self, etl_id: str, target_id: str, status: dict[str, Any]) -> None:
        name = document_name(etl_id)
        value = json.dumps({**status, "target": target_id}, sort_keys=True)
        try:
            doc = await self._call(
                "PATCH", self.kube.path("configmaps", name),
                body={"metadata": {"annotations": {status_key(target_id): value}}},
                content_type="application/merge-patch+json")
        except KubeError as e:
            if e.status == 404:
                return  # stopped meanwhile: leave no status behind
            raise
        await self._post_event(doc, target_id, status)

    async def _post_event(self, doc: Obj, target_id: str, status: dict[str, Any]) -> None:
        """An Event on the declaration when this target's state or reason changed."""
        meta = doc["metadata"]
        state, reason = str(status.get("state", "")), str(status.get("reason", ""))
        key = (meta["uid"], target_id)
        if self._posted.get(key) == (state, reason):
            return
        self._posted[key] = (state, reason)
        message = f"target {target_id}: {state}" + (f": {reason}" if reason else "")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        event = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                         "labels": self.labels()},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"],
                               "namespace": self.kube.namespace, "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion", "")},
            "reason": EVENT_REASONS.get(state, "TransformerInitializing"),
            "message": message[:1000],
            "type": "Warning" if state == FAILED else "Normal",
            "source": {"component": "aisetl-target", "host": self.node},
            "reportingComponent": "aisetl.io/target",
            "reportingInstance": label_value(target_id),
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self._call("POST", self.kube.path("events"), body=event)
        except (KubeError, Unavailable) as e:  # status is recorded; the event is a courtesy
            log.warning("could not post ETL event", etl=meta["name"], error=str(e))

    async def etl_statuses(self, etl_id: str) -> dict[str, dict[str, Any]]:
        doc = await self._get_etl(etl_id)
        return _statuses(doc) if doc is not None else {}

    # --- offline jobs ------------------------------------------------------------------------
    def _xaction_name(self, xid: str) -> str:
        return record_name("aisetl-xaction", xid)

    async def put_xaction(self, xid: str, record: dict[str, Any]) -> None:
        data = {"id": xid, "record.json": json.dumps(record)}
        try:
            await self._call("PATCH", self.kube.path("configmaps", self._xaction_name(xid)),
                             body={"data": data}, content_type="application/merge-patch+json")
            return
        except KubeError as e:
            if e.status != 404:
                raise
        body = {"metadata": {"name": self._xaction_name(xid),
                             "labels": self.labels(**{XACTION_LABEL: "true"})},
                "data": data}
        try:
            await self._call("POST", self.kube.path("configmaps"), body=body)
        except KubeError as e:
            if e.status != 409:
                raise
            await self.put_xaction(xid, record)  # created meanwhile: patch it

    @staticmethod
    def _xaction(doc: Obj) -> dict[str, Any] | None:
        try:
            rec = json.loads((doc.get("data") or {})["record.json"])
        except (KeyError, ValueError, TypeError):
            return None
        return rec if isinstance(rec, dict) else None

    async def get_xaction(self, xid: str) -> dict[str, Any] | None:
        try:
            doc = await self._call("GET", self.kube.path("configmaps", self._xaction_name(xid)))
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        return self._xaction(doc)

    async def list_xactions(self) -> list[dict[str, Any]]:
        docs = await self._list("configmaps", f"{XACTION_LABEL}=true")
        recs = (self._xaction(d) for d in sorted(docs, key=lambda d: d["metadata"]["name"]))
        return [r for r in recs if r is not None]

    # --- watching ----------------------------------------------------------------------------
    def _notify(self, kinds: set[str]) -> None:
        if kinds:
            for sub in list(self._subscribers):
                sub.notify(kinds)

    def _on_etl(self, _type: str, old: Obj | None, new: Obj | None) -> None:
        if not ((old is not None and self._ours(old)) or (new is not None and self._ours(new))):
            return  # another release's declaration
        if old is None or new is None:
            self._notify({ETLS, ETL_STATUS})
            return
        kinds = set()
        if old.get("data") != new.get("data"):
            kinds.add(ETLS)
        if _statuses(old) != _statuses(new):
            kinds.add(ETL_STATUS)
        self._notify(kinds)

    def _on_pod(self, _type: str, old: Obj | None, new: Obj | None) -> None:
        def shape(p: Obj | None) -> tuple[Any, ...] | None:
            if p is None:
                return None
            return (target_info(p), _is_ready(p), bool(p["metadata"].get("deletionTimestamp")))

        if shape(old) != shape(new):
            self._notify({TARGETS})

    def _start_informers(self) -> None:
        def resync() -> None:
            self._notify(set(ALL_KINDS))

        def simple(kind: str) -> Callable[[str, Obj | None, Obj | None], None]:
            return lambda _t, _o, _n: self._notify({kind})

        self._informers = [
            Informer(self.kube, "configmaps", f"{ETL_LABEL}=true", self._on_etl, resync,
                     name="etls").start(),
            Informer(self.kube, "configmaps", f"{BUCKET_LABEL}=true", simple(BUCKETS), resync,
                     name="buckets").start(),
            Informer(self.kube, "configmaps", f"{XACTION_LABEL}=true", simple(XACTIONS),
                     resync, name="xactions").start(),
            Informer(self.kube, "pods", self._target_selector(), self._on_pod, resync,
                     name="targets").start(),
        ]

    async def watch(self) -> AsyncIterator[str]:
        if not self._informers:
            self._start_informers()
        sub = _Subscriber(asyncio.get_running_loop())
        self._subscribers.add(sub)
        try:
            while True:
                await sub.wake.wait()
                sub.wake.clear()
                while sub.pending:
                    kind = next(k for k in ALL_KINDS if k in sub.pending)
                    sub.pending.discard(kind)
                    yield kind
        finally:
            self._subscribers.discard(sub)

    @property
    def relists(self) -> int:
        """Lists done by the informers so far (the first ones included): for tests."""
        return sum(i.relists for i in self._informers)

    async def close(self) -> None:
        informers, self._informers = self._informers, []
        await asyncio.gather(*(asyncio.to_thread(i.stop) for i in informers))
        await asyncio.to_thread(self.kube.close)
