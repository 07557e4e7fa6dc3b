"""ETL ConfigMaps become transformer pods pinned to the target's node.

Against a real kube-apiserver with no kubelet: the ``kubelet`` fixture patches
pod statuses. Where a transformer must answer, ``runtime_server`` runs the
python3 runtime on a free loopback port; the orchestrator's runtime port is set
to that port and the pod's status gets podIP 127.0.0.1, so the target reaches
the real server at the address the pod reports.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import aiohttp
import pytest
from kubernetes.client import ApiClient

from aisetl.kube.client import Kube
from aisetl.model.errors import EtlNotFound
from aisetl.model.etl import document_name, from_document, parse_init, to_document
from aisetl.model.reconcile import FAILED, READY
from aisetl.orchestrator.base import TransformerContext
from aisetl.orchestrator.kubernetes import KubernetesOrchestrator, KubernetesOrchestratorSettings
from tests.k8s.conftest import Kubelet, Namespace, eventually
from tests.k8s.support import (
    MD5_CODE,
    NODE,
    RELEASE,
    SECRET,
    TARGET_URL,
    build_doc,
    live_pods_of,
    pods_of,
    running_target,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(120)]


def _env(container: dict[str, object]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}  # type: ignore


async def test_build_configmap_yields_pinned_pod_and_turns_ready_with_a_real_transformer(
        ns: Namespace, kubelet: Kubelet, runtime_server, tmp_path: Path) -> None:
    port = await runtime_server(MD5_CODE)
    async with running_target(ns.kube, tmp_path, runtime_port=port) as t:
        await t.store.create_etl(build_doc("md5-etl", deps="# none\n"))
        pod = (await eventually(lambda: pods_of(ns.kube, "md5-etl"), what="pod"))[0]
        cm = ns.kube.request("GET", ns.kube.path("configmaps", document_name("md5-etl")))
        meta, spec = pod["metadata"], pod["spec"]
        assert spec["nodeName"] == NODE
        assert meta["labels"] == {
            "app.kubernetes.io/part-of": "aisetl", "app.kubernetes.io/component": "transformer",
            "app.kubernetes.io/instance": RELEASE, "aisetl.io/etl-id": "md5-etl",
            "aisetl.io/node": NODE, "aisetl.io/target": "target-a",
            "aisetl.io/comm-type": "hpush"}
        assert [(o["kind"], o["name"], o["uid"]) for o in meta["ownerReferences"]] == [
            ("ConfigMap", cm["metadata"]["name"], cm["metadata"]["uid"])]
        c = spec["containers"][0]
        assert c["image"] == "example.org/runtime-python3:test"
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": port,
                                                  "scheme": "HTTP"}
        assert c["ports"][0]["containerPort"] == port
        assert _env(c)["AIS_TARGET_URL"] == f"{TARGET_URL}/v1/etl/objects/{SECRET}"
        assert "PYTHONPATH" not in _env(c) and "initContainers" not in spec  # no deps
        assert {v["name"]: v.get("configMap", {}).get("name") for v in spec["volumes"]}[
            "code"] == cm["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["restartPolicy"] == "Never"

        # not Ready yet: the ETL is Initializing
        st = await t.store.etl_statuses("md5-etl")
        assert st.get("target-a", {}).get("state") != READY

        kubelet.run(meta["name"])  # the "kubelet": podIP 127.0.0.1, Ready=True
        await eventually(lambda: t.manager.slots["md5-etl"].ready.is_set(), what="Ready")
        st = await eventually(lambda: _state(t, "md5-etl", READY), what="Ready status")
        assert st["endpoint"] == f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s, s.put(st["endpoint"], data=b"hello") as r:
            assert await r.read() == hashlib.md5(b"hello").hexdigest().encode()

        described = await eventually(lambda: _described(ns, document_name("md5-etl"),
                                                         "TransformerReady"), what="event")
        assert "target target-a: Ready" in described

        # stop: the declaration goes, the reconciler deletes the pod
        await t.store.delete_etl("md5-etl")
        await eventually(lambda: not live_pods_of(ns.kube, "md5-etl"), what="pod deleted")
        with pytest.raises(EtlNotFound):
            await t.store.delete_etl("md5-etl")


def _described(ns: Namespace, configmap: str, needle: str) -> str | None:
    """``kubectl describe configmap`` once it shows ``needle``."""
    out = ns.cp.kubectl("-n", ns.name, "describe", "configmap", configmap).stdout
    return out if needle in out else None


async def _state(t, etl_id: str, state: str):  # type: ignore[no-untyped-def]
    st = (await t.store.etl_statuses(etl_id)).get(t.ctx.target_id)
    return st if st and st["state"] == state else None


async def test_build_with_dependencies_installs_them_in_an_init_container(
        ns: Namespace, tmp_path: Path) -> None:
    async with running_target(ns.kube, tmp_path) as t:
        await t.store.create_etl(build_doc("with-deps", deps="tqdm==4.66.0\n"))
        spec = (await eventually(lambda: pods_of(ns.kube, "with-deps")))[0]["spec"]
        init = spec["initContainers"][0]
        assert init["command"][-4:] == ["--target", "/deps", "-r", "/etc/aisetl/etl/deps.txt"]
        assert init["image"] == spec["containers"][0]["image"]
        assert _env(spec["containers"][0])["PYTHONPATH"] == "/deps"
        assert {"name": "deps", "emptyDir": {"sizeLimit": "2Gi"}} in spec["volumes"]


INIT_SPEC = textwrap.dedent("""\
    apiVersion: v1
    kind: Pod
    metadata:
      name: transformer-echo
      annotations:
        communication_type: "hrev://"
        wait_timeout: 30s
    spec:
      containers:
        - name: server
          image: example.org/echo:1
          ports: [{name: default, containerPort: 8123}]
          env: [{name: FOO, value: bar}]
""")


async def test_kubectl_applied_init_configmap_yields_pod_with_tcp_probe(
        ns: Namespace, tmp_path: Path) -> None:
    doc = to_document(parse_init(INIT_SPEC, etl_id="echo"))
    async with running_target(ns.kube, tmp_path):
        ns.cp.kubectl("-n", ns.name, "apply", "-f", "-", stdin=json.dumps(doc))
        pod = (await eventually(lambda: pods_of(ns.kube, "echo"), what="pod"))[0]
    c = pod["spec"]["containers"][0]
    assert pod["spec"]["nodeName"] == NODE
    assert pod["metadata"]["labels"]["aisetl.io/comm-type"] == "hrev"
    assert c["image"] == "example.org/echo:1"
    assert c["readinessProbe"]["tcpSocket"] == {"port": 8123}
    assert _env(c) == {"FOO": "bar", "AIS_TARGET_URL": f"{TARGET_URL}/v1/etl/objects/{SECRET}",
                       "AISETL_ETL_ID": "echo"}
    assert pod["metadata"]["ownerReferences"][0]["name"] == "aisetl-etl-echo"


async def test_wait_timeout_deletes_the_pod_and_reports_why(
        ns: Namespace, kubelet: Kubelet, tmp_path: Path) -> None:
    async with running_target(ns.kube, tmp_path) as t:
        await t.store.create_etl(build_doc("slow", wait_timeout="3s"))
        pod = (await eventually(lambda: pods_of(ns.kube, "slow"), what="pod"))[0]
        kubelet.image_pull_fails(pod["metadata"]["name"], "pull access denied for runtime")
        st = await eventually(lambda: _state(t, "slow", FAILED), what="Failed status")
        assert "was not ready within 3s" in st["reason"]
        assert "ErrImagePull: pull access denied" in st["reason"]
        assert "event Failed: Failed to pull image" in st["reason"]
        await eventually(lambda: not live_pods_of(ns.kube, "slow"), what="pod deleted")
        described = await eventually(lambda: _described(ns, "aisetl-etl-slow",
                                                         "TransformerFailed"), what="event")
        assert "ErrImagePull" in described
        events = ns.kube.request("GET", ns.kube.path("events"), query={
            "fieldSelector": "involvedObject.name=aisetl-etl-slow"})["items"]
        assert any(e["type"] == "Warning" for e in events)


async def test_deleting_the_configmap_garbage_collects_the_pods(
        ns: Namespace, tmp_path: Path) -> None:
    # only the orchestrator: no target is there to stop anything
    async with running_target(ns.kube, tmp_path) as t:
        await ns.kube.call("POST", ns.kube.path("configmaps"), body=build_doc("gc-me"))
        ctx = TransformerContext("target-b", TARGET_URL, SECRET, tmp_path, tmp_path, NODE)
        decl = from_document(build_doc("gc-me"))  # type: ignore[arg-type]
        await t.orchestrator.start(decl, ctx)
        assert len(live_pods_of(ns.kube, "gc-me")) >= 1
        await t.manager.close()  # the reconciler must not be the one deleting
        ns.cp.kubectl("-n", ns.name, "delete", "configmap", "aisetl-etl-gc-me", "--wait=false")
        await eventually(lambda: not live_pods_of(ns.kube, "gc-me"), timeout=60,
                         what="garbage collection of the pods")


async def test_cleanup_stale_deletes_pods_left_on_this_node(
        ns: Namespace, tmp_path: Path) -> None:
    await ns.kube.call("POST", ns.kube.path("configmaps"), body=build_doc("left"))
    decl = from_document(build_doc("left"))  # type: ignore[arg-type]
    ctx = TransformerContext("target-a", TARGET_URL, SECRET, tmp_path, tmp_path, NODE)
    crashed = KubernetesOrchestrator(Kube(ApiClient(ns.kube.api.configuration), ns.name),
                                     KubernetesOrchestratorSettings(release=RELEASE, node=NODE))
    await crashed.start(decl, ctx)
    await crashed.close()  # the previous run of the target ends without stopping its pod
    await ns.kube.call("DELETE", ns.kube.path("configmaps", "aisetl-etl-left"),
                       body={"propagationPolicy": "Orphan"})
    assert live_pods_of(ns.kube, "left")
    async with running_target(ns.kube, tmp_path):
        await eventually(lambda: not live_pods_of(ns.kube, "left"), what="stale pod deleted")
