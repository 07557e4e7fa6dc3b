"""The Kubernetes control store against a real API server: records, membership, watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from aisetl.control.base import ALL_KINDS, BUCKETS, ETL_STATUS, ETLS, TARGETS, XACTIONS
from aisetl.control.kubernetes import KubernetesControlStore
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import BucketExists, BucketNotFound, EtlExists
from tests.k8s.conftest import ControlPlane, Kubelet, Namespace, eventually
from tests.k8s.support import RELEASE, build_doc

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(120)]


@contextlib.asynccontextmanager
async def store_of(ns: Namespace) -> AsyncIterator[KubernetesControlStore]:
    s = KubernetesControlStore(ns.cp.kube(ns.name), RELEASE, node="node-a")
    try:
        yield s
    finally:
        await s.close()


class Watcher:
    """Collects the kinds a store's watch yields, in a background task."""

    def __init__(self, store: KubernetesControlStore) -> None:
        self.kinds: list[str] = []
        self.task = asyncio.create_task(self._run(store))

    async def _run(self, store: KubernetesControlStore) -> None:
        async for kind in store.watch():
            self.kinds.append(kind)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_buckets_are_configmaps_created_exclusively(ns: Namespace) -> None:
    async with store_of(ns) as s:
        await s.create_bucket(BucketInfo("Images_v1.2", created=1.0))
        with pytest.raises(BucketExists):
            await s.create_bucket(BucketInfo("Images_v1.2"))
        await s.create_bucket(BucketInfo("images-v1-2"))  # same DNS form, other bucket
        assert [b.name for b in await s.list_buckets()] == ["Images_v1.2", "images-v1-2"]
        assert (await s.get_bucket("Images_v1.2")) == BucketInfo("Images_v1.2", created=1.0)
        assert await s.get_bucket("nope") is None
        await s.delete_bucket("Images_v1.2")
        with pytest.raises(BucketNotFound):
            await s.delete_bucket("Images_v1.2")
        cms = ns.kube.request("GET", ns.kube.path("configmaps"),
                              query={"labelSelector": "aisetl.io/bucket=true"})["items"]
        assert [c["metadata"]["labels"]["app.kubernetes.io/instance"] for c in cms] == [RELEASE]


async def test_xaction_records_are_written_and_rewritten(ns: Namespace) -> None:
    async with store_of(ns) as s:
        await s.put_xaction("X1", {"id": "X1", "state": "running"})
        await s.put_xaction("X1", {"id": "X1", "state": "finished"})
        assert await s.get_xaction("X1") == {"id": "X1", "state": "finished"}
        assert await s.get_xaction("X2") is None
        assert await s.list_xactions() == [{"id": "X1", "state": "finished"}]


async def test_etl_declarations_and_statuses(ns: Namespace) -> None:
    async with store_of(ns) as s:
        await s.create_etl(build_doc("Md5_x"))
        with pytest.raises(EtlExists):
            await s.create_etl(build_doc("Md5_x"))
        # a declaration of another release in the same namespace is not ours
        other = build_doc("other")
        other["metadata"]["labels"]["app.kubernetes.io/instance"] = "another"  # type: ignore
        ns.kube.request("POST", ns.kube.path("configmaps"), body=other)
        assert [d["data"]["id"] for d in await s.list_etls()] == ["Md5_x"]
        await s.put_etl_status("Md5_x", "target-a", {"state": "Ready", "reason": ""})
        await s.put_etl_status("Md5_x", "T_weird/id", {"state": "Failed", "reason": "x"})
        assert await s.etl_statuses("Md5_x") == {
            "target-a": {"state": "Ready", "reason": ""},
            "T_weird/id": {"state": "Failed", "reason": "x"}}
        await s.delete_etl("Md5_x")
        assert await s.etl_statuses("Md5_x") == {}
        await s.put_etl_status("Md5_x", "target-a", {"state": "Ready"})  # stopped: no-op
        assert await s.list_etls() == []


async def test_membership_is_the_ready_target_pods_of_the_release(
        ns: Namespace, kubelet: Kubelet) -> None:
    def target_pod(name: str, release: str = RELEASE) -> dict[str, object]:
        return {"metadata": {"name": name, "labels": {
                    "app.kubernetes.io/instance": release,
                    "app.kubernetes.io/component": "target"}},
                "spec": {"nodeName": f"node-{name[-1]}", "containers": [{
                    "name": "target", "image": "x",
                    "ports": [{"name": "http", "containerPort": 9081}]}]}}

    for name, release in (("t-1", RELEASE), ("t-2", RELEASE), ("t-3", "another")):
        ns.kube.request("POST", ns.kube.path("pods"), body=target_pod(name, release))
    async with store_of(ns) as s:
        w = Watcher(s)
        assert await s.live_targets() == []
        kubelet.run("t-1", ip="127.0.0.11")
        kubelet.run("t-2", ip="127.0.0.12", ready=False)
        kubelet.run("t-3", ip="127.0.0.13")
        assert await s.live_targets() == [TargetInfo("t-1", "http://127.0.0.11:9081", "node-1")]
        await eventually(lambda: w.kinds.count(TARGETS) >= 2, what="a TARGETS change")
        # a target counts itself once its pod has an IP (its readiness asks "joined?")
        await s.heartbeat(TargetInfo("t-2", "http://127.0.0.12:9081", "node-2"))
        assert [t.id for t in await s.live_targets()] == ["t-1", "t-2"]
        await w.stop()


async def test_watch_tells_status_changes_from_declaration_changes(ns: Namespace) -> None:
    async with store_of(ns) as s:
        w = Watcher(s)
        await eventually(lambda: len(w.kinds) >= len(ALL_KINDS), what="initial kinds")
        assert sorted(w.kinds) == sorted(ALL_KINDS)
        w.kinds.clear()
        await s.create_etl(build_doc("w1"))
        await eventually(lambda: ETLS in w.kinds, what="ETLS")
        await asyncio.sleep(0.3)  # let trailing events of the create arrive before clearing
        w.kinds.clear()
        await s.put_etl_status("w1", "target-a", {"state": "Ready"})
        await eventually(lambda: ETL_STATUS in w.kinds, what="ETL_STATUS")
        await asyncio.sleep(0.3)  # a negative check needs a window: no ETLS event within it
        assert ETLS not in w.kinds  # a status report makes no target reconcile
        await s.create_bucket(BucketInfo("b"))
        await s.put_xaction("x", {"id": "x"})
        await eventually(lambda: BUCKETS in w.kinds and XACTIONS in w.kinds, what="kinds")
        await w.stop()


@pytest.mark.slow
async def test_watch_survives_an_api_server_restart(
        ns: Namespace, apiserver: ControlPlane) -> None:
    async with store_of(ns) as s:
        w = Watcher(s)
        await eventually(lambda: len(w.kinds) >= len(ALL_KINDS), what="initial kinds")
        lists_before = s.relists
        w.kinds.clear()
        await asyncio.to_thread(apiserver.restart_apiserver)
        # after the break every kind is reported (callers re-read from scratch) ...
        await eventually(lambda: set(w.kinds) >= set(ALL_KINDS), timeout=30,
                         what="every kind after the watch was re-established")
        assert s.relists > lists_before
        w.kinds.clear()
        # ... and changes made after the restart arrive through the new watch
        ns.kube.request("POST", ns.kube.path("configmaps"), body=build_doc("after"))
        await eventually(lambda: ETLS in w.kinds, timeout=15, what="ETLS after restart")
        assert [d["data"]["id"] for d in await s.list_etls()] == ["after"]
        await w.stop()
