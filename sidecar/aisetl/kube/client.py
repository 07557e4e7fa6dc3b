"""Our own small face of the Kubernetes API, over the official ``kubernetes`` client.

The control store and the orchestrator are siblings that must not import each
other, and both talk to the API server: this module is what they share. It
owns three things:

- ``Kube``: namespaced requests as plain JSON dicts (the declaration documents
  *are* ConfigMap dicts, so no model classes in between). The official client
  does configuration (in-cluster service account with token refresh, or a
  kubeconfig), TLS, auth and connection pooling; we call its generic
  ``param_serialize`` / ``call_api`` and map failures to ``KubeError``.
  Requests block; async callers go through ``Kube.call`` (``asyncio.to_thread``).
- ``Informer``: list + watch of one label-selected collection in a thread of its
  own, with a cache by name. A watch resumes from the last resourceVersion
  (bookmarks keep it fresh); 410 Gone (the version was compacted away) means
  list again from scratch; any other break (API server restart, network)
  means back off, list again, and report a resync. Watch streams are
  long-lived blocking reads, so they run on dedicated daemon threads instead
  of the shared ``to_thread`` pool, which they would otherwise occupy forever.
- ``label_value``: a string made safe for a label value (63 characters).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("aisetl.kube")

Obj = dict[str, Any]

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """``value`` if it is a valid label value, else a readable prefix plus a digest."""
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:50].strip("-_.")
    return f"{prefix}-{digest}" if prefix else digest


def dns_name(value: str, max_len: int = 63) -> str:
    """A DNS-1123 label from ``value``: lowercase, '-' for anything else, trimmed."""
    s = re.sub(r"[^a-z0-9-]", "-", value.lower()).strip("-")
    return s[:max_len].rstrip("-") or "x"


class KubeError(Exception):
    """The API server refused a request, or could not be reached (status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class Gone(KubeError):
    """410: the resourceVersion a watch asked for is too old: list again."""


@dataclass
class KubeSettings:
    """Timeouts of API calls and the pace of watches."""

    request_timeout: float = 15.0
    """Seconds a single (non-watch) request may take."""
    watch_timeout: int = 240
    """Seconds the API server keeps a watch open before we re-establish it."""
    backoff: float = 0.2
    """First pause after a broken watch; doubles up to ``max_backoff``."""
    max_backoff: float = 5.0


class Kube:
    """Namespaced API requests returning JSON dicts."""

    def __init__(self, api_client: Any, namespace: str,
                 settings: KubeSettings | None = None) -> None:
        self.api = api_client
        self.namespace = namespace
        self.settings = settings or KubeSettings()

    @classmethod
    def from_environment(cls, namespace: str | None = None,
                         settings: KubeSettings | None = None) -> Kube:
        """In-cluster service account when running in a pod, else $KUBECONFIG."""
        config = kubernetes.client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=config)
            ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            if namespace is None and os.path.exists(ns_file):
                with open(ns_file) as f:
                    namespace = f.read().strip()
        else:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG"), client_configuration=config)
        return cls(kubernetes.client.ApiClient(config), namespace or "default", settings)

    @classmethod
    def from_kubeconfig(cls, path: str, namespace: str,
                        settings: KubeSettings | None = None) -> Kube:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=config)
        return cls(kubernetes.client.ApiClient(config), namespace, settings)

    def close(self) -> None:
        self.api.close()

    # --- paths ---------------------------------------------------------------------------
    def path(self, resource: str, name: str = "") -> str:
        base = f"/api/v1/namespaces/{self.namespace}/{resource}"
        return f"{base}/{name}" if name else base

    # --- requests --------------------------------------------------------------------------
    def _send(self, method: str, path: str, query: dict[str, Any] | None,
              body: Any, content_type: str | None, timeout: Any) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        _m, url, hdrs, data, _p = self.api.param_serialize(
            method, path, query_params=params, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            return self.api.call_api(method, url, header_params=hdrs, body=data,
                                     _request_timeout=timeout)
        except kubernetes.client.ApiException as e:  # raised before any status
            raise KubeError(0, "Error", str(e)) from e
        except Exception as e:  # urllib3 errors: refused, reset, timed out, TLS
            raise KubeError(0, "Unreachable", f"{type(e).__name__}: {e}") from e

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                body: Any = None, content_type: str | None = None) -> Obj:
        """One request; the decoded JSON answer, or KubeError."""
        t = self.settings.request_timeout
        resp = self._send(method, path, query, body, content_type, (min(5.0, t), t))
        try:
            raw = resp.read()
        except Exception as e:
            raise KubeError(0, "Unreachable", f"{type(e).__name__}: {e}") from e
        return _decode(resp.status, raw)

    def request_text(self, path: str, query: dict[str, Any] | None = None) -> str:
        """A GET whose answer is text (pod logs)."""
        t = self.settings.request_timeout
        resp = self._send("GET", path, query, None, None, (min(5.0, t), t))
        raw = resp.read()
        if not 200 <= resp.status < 300:
            _decode(resp.status, raw)
        return str(raw.decode(errors="replace"))

    async def call(self, method: str, path: str, **kw: Any) -> Obj:
        """``request`` off the event loop."""
        return await asyncio.to_thread(self.request, method, path, **kw)

    def watch(self, path: str, query: dict[str, Any],
              on_open: Callable[[Any], None]) -> Iterator[Obj]:
        """Watch events (``{"type", "object"}``) until the server ends the stream."""
        q = {**query, "watch": "true", "allowWatchBookmarks": "true",
             "timeoutSeconds": self.settings.watch_timeout}
        resp = self._send("GET", path, q, None, None,
                          (5.0, self.settings.watch_timeout + 30.0))
        if resp.status != 200:
            _decode(resp.status, resp.read())
        raw = resp.response  # urllib3 response, not read yet
        on_open(raw)
        try:
            for line in iter_resp_lines(raw):  # type: ignore[no-untyped-call]
                if line:
                    yield json.loads(line)
        finally:
            raw.release_conn()


def _decode(status: int, raw: bytes) -> Obj:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = {"message": raw[:500].decode(errors="replace")}
    if 200 <= status < 300:
        return doc
    cls = Gone if status == 410 else KubeError
    raise cls(status, str(doc.get("reason", "")), str(doc.get("message", doc)))


def strip(obj: Obj) -> Obj:
    """The object without managedFields (noise in documents and logs)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


# --- informers ---------------------------------------------------------------------------------
OnEvent = Callable[[str, Obj | None, Obj | None], None]


class Informer:
    """Lists and watches one collection in a daemon thread, keeping a cache by name.

    ``on_event(type, old, new)`` runs in that thread for every change (after a
    relist: for each difference from the cache); ``on_resync()`` after every
    relist that followed a broken watch. Both must be quick and thread-safe
    (typically ``loop.call_soon_threadsafe``).
    """

    def __init__(self, kube: Kube, resource: str, label_selector: str,
                 on_event: OnEvent, on_resync: Callable[[], None] | None = None,
                 name: str = "") -> None:
        self.kube = kube
        self.resource = resource
        self.selector = label_selector
        self.on_event = on_event
        self.on_resync = on_resync or (lambda: None)
        self.cache: dict[str, Obj] = {}
        self.synced = threading.Event()
        self.relists = 0
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"informer-{name or resource}")

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:  # unblock a read in progress
            try:
                resp.shutdown()
            except Exception:  # best effort: the thread also checks _stop
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    async def wait_synced(self, timeout: float) -> bool:
        return await asyncio.to_thread(self.synced.wait, timeout)

    def _list(self) -> str:
        doc = self.kube.request("GET", self.kube.path(self.resource),
                                query={"labelSelector": self.selector})
        fresh = {o["metadata"]["name"]: strip(o) for o in doc.get("items") or []}
        old = self.cache
        self.cache = fresh
        for name, obj in fresh.items():
            prev = old.get(name)
            if prev is None:
                self.on_event("ADDED", None, obj)
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get(
                    "resourceVersion"):
                self.on_event("MODIFIED", prev, obj)
        for name, prev in old.items():
            if name not in fresh:
                self.on_event("DELETED", prev, None)
        return str(doc.get("metadata", {}).get("resourceVersion", ""))

    def _run(self) -> None:
        delay = self.kube.settings.backoff
        broken = False
        while not self._stop.is_set():
            try:
                rv = self._list()
                self.relists += 1
                self.synced.set()
                if broken:
                    self.on_resync()
                broken = False
                delay = self.kube.settings.backoff
                while not self._stop.is_set():
                    rv = self._watch_once(rv)
            except Gone:
                log.info("watch of %s expired (410): listing again", self.resource)
                broken = True
            except Exception as e:
                if self._stop.is_set():
                    break
                log.warning("watch of %s broke (%s): listing again in %.1fs",
                            self.resource, e, delay)
                broken = True
                self._stop.wait(delay)
                delay = min(delay * 2, self.kube.settings.max_backoff)

    def _set_resp(self, resp: Any) -> None:
        self._resp = resp
        if self._stop.is_set():
            resp.shutdown()

    def _watch_once(self, rv: str) -> str:
        """Follow one watch stream from ``rv``; return the version to resume from."""
        for ev in self.kube.watch(self.kube.path(self.resource),
                                  {"labelSelector": self.selector, "resourceVersion": rv},
                                  self._set_resp):
            kind, obj = ev.get("type"), ev.get("object") or {}
            if kind == "ERROR":
                status = int(obj.get("code") or 0)
                cls = Gone if status == 410 else KubeError
                raise cls(status, str(obj.get("reason", "")), str(obj.get("message", "")))
            rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
            if kind == "BOOKMARK":
                continue
            obj = strip(obj)
            name = obj["metadata"]["name"]
            prev = self.cache.get(name)
            if kind == "DELETED":
                self.cache.pop(name, None)
                self.on_event(kind, prev, None)
            else:
                self.cache[name] = obj
                self.on_event(str(kind), prev, obj)
        if self._stop.is_set():
            raise KubeError(0, "Stopped", "informer stopped")
        return rv


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
