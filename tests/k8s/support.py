"""An in-process storage target against the real API server: the control store,
the orchestrator and the reconciler, wired as ``target/app.py`` wires them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aisetl.control.kubernetes import KubernetesControlStore
from aisetl.control.view import ClusterView
from aisetl.etl.manager import EtlManager
from aisetl.kube.client import Kube, Obj
from aisetl.model.etl import parse_build, to_document
from aisetl.observability.metrics import Metrics
from aisetl.orchestrator.base import TransformerContext
from aisetl.orchestrator.kubernetes import (
    KubernetesOrchestrator,
    KubernetesOrchestratorSettings,
)
from aisetl.settings import EtlSettings

RELEASE = "rel"
NODE = "node-a"
TARGET_URL = "http://10.1.2.3:8081"
SECRET = "s3cr3t"
MD5_CODE = "import hashlib\n\ndef transform(b):\n    return hashlib.md5(b).hexdigest().encode()\n"


@dataclass
class Target:
    store: KubernetesControlStore
    orchestrator: KubernetesOrchestrator
    manager: EtlManager
    ctx: TransformerContext


@contextlib.asynccontextmanager
async def running_target(kube: Kube, tmp: Path, *, runtime_port: int = 8000,
                         target_id: str = "target-a") -> AsyncIterator[Target]:
    """``kube`` decides the credentials; the store and orchestrator get their own copies."""
    def copy() -> Kube:
        from kubernetes.client import ApiClient

        return Kube(ApiClient(kube.api.configuration), kube.namespace)

    store = KubernetesControlStore(copy(), RELEASE, node=NODE)
    orch = KubernetesOrchestrator(copy(), KubernetesOrchestratorSettings(
        release=RELEASE, node=NODE, runtime_port=runtime_port,
        runtime_images={"python3": "example.org/runtime-python3:test",
                        "python2": "example.org/runtime-python2:test"}))
    ctx = TransformerContext(target_id=target_id, target_url=TARGET_URL, secret=SECRET,
                             work_dir=tmp, cache_dir=tmp, node=NODE)
    await orch.cleanup_stale(ctx)
    manager = EtlManager(store, orch, ctx, Metrics.create(), EtlSettings())
    view = ClusterView(store)
    view.on_change(manager.on_change)
    task = await view.start()
    try:
        yield Target(store, orch, manager, ctx)
    finally:
        await ClusterView.stop(task)
        await manager.close()
        await orch.close()
        await store.close()


def build_doc(etl_id: str, wait_timeout: str = "30s", deps: str = "",
              comm: str = "hpush://") -> dict[str, object]:
    decl = parse_build({"id": etl_id, "runtime": "python3", "code": MD5_CODE,
                        "dependencies": deps, "wait_timeout": wait_timeout,
                        "communication_type": comm, "encoding": "text"})
    return to_document(decl)


def pods_of(kube: Kube, etl_id: str) -> list[Obj]:
    doc = kube.request("GET", kube.path("pods"),
                       query={"labelSelector": f"aisetl.io/etl-id={etl_id}"})
    return list(doc.get("items") or [])


def live_pods_of(kube: Kube, etl_id: str) -> list[Obj]:
    return [p for p in pods_of(kube, etl_id) if not p["metadata"].get("deletionTimestamp")]
