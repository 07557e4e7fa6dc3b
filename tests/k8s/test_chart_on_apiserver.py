"""The chart against the real API server: its Role is enough, install and upgrade work.

RBAC is enforced by this API server (``--authorization-mode RBAC``). The chart's
ServiceAccounts, Roles and RoleBindings are rendered with ``helm template`` and
applied; the sidecar code then runs with tokens of those ServiceAccounts
(``kubectl create token``), so any verb the code needs and the Role lacks fails
the test with a 403.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aisetl.control.kubernetes import KubernetesControlStore
from aisetl.kube.client import Kube, KubeError
from aisetl.model.cluster import BucketInfo
from aisetl.model.reconcile import READY
from tests.k8s.conftest import REPO, Kubelet, Namespace, eventually, kubeconfig_for, run
from tests.k8s.support import MD5_CODE, RELEASE, build_doc, live_pods_of, running_target

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(180)]


async def test_sidecar_works_with_the_chart_service_accounts_and_roles(
        ns: Namespace, helm: str, kubelet: Kubelet, runtime_server, tmp_path: Path) -> None:
    rbac = run(helm, "template", RELEASE, str(REPO / "chart"), "--namespace", ns.name,
               "--show-only", "templates/serviceaccount.yaml",
               "--show-only", "templates/role.yaml", "--show-only", "templates/rolebinding.yaml")
    ns.cp.kubectl("-n", ns.name, "apply", "-f", "-", stdin=rbac)
    gw = Kube.from_kubeconfig(str(kubeconfig_for(ns, f"{RELEASE}-aisetl-gateway",
                                                 tmp_path / "gw")), ns.name)
    tg = Kube.from_kubeconfig(str(kubeconfig_for(ns, f"{RELEASE}-aisetl-target",
                                                 tmp_path / "tg")), ns.name)
    # the Role is really enforced: the gateway may not create pods
    with pytest.raises(KubeError) as denied:
        gw.request("POST", gw.path("pods"), body={"metadata": {"name": "x"}, "spec": {
            "containers": [{"name": "x", "image": "x"}]}})
    assert denied.value.status == 403

    gateway = KubernetesControlStore(gw, RELEASE)
    port = await runtime_server(MD5_CODE)
    try:
        async with running_target(tg, tmp_path, runtime_port=port) as t:
            await gateway.create_bucket(BucketInfo("b1"))
            assert [b.name for b in await t.store.list_buckets()] == ["b1"]
            assert await gateway.live_targets() == []
            await gateway.create_etl(build_doc("rbac-etl"))
            pod = (await eventually(lambda: live_pods_of(ns.kube, "rbac-etl"), what="pod"))[0]
            kubelet.run(pod["metadata"]["name"])
            st = await eventually(
                lambda: _ready(gateway, "rbac-etl", t.ctx.target_id), what="Ready via gateway")
            assert st["endpoint"] == f"http://127.0.0.1:{port}"
            def reasons() -> list[str]:  # the Event follows the status annotation
                return [e["reason"] for e in ns.kube.request("GET", ns.kube.path("events"), query={
                    "fieldSelector": "involvedObject.name=aisetl-etl-rbac-etl"})["items"]]

            assert await eventually(reasons, what="event") == ["TransformerReady"]
            await gateway.delete_etl("rbac-etl")
            await eventually(lambda: not live_pods_of(ns.kube, "rbac-etl"), what="pod gone")
            await gateway.delete_bucket("b1")
    finally:
        await gateway.close()


async def _ready(store: KubernetesControlStore, etl_id: str, target: str):  # type: ignore
    st = (await store.etl_statuses(etl_id)).get(target)
    return st if st and st["state"] == READY else None


def test_helm_install_and_upgrade_succeed(ns: Namespace, helm: str) -> None:
    base = [helm, "--kubeconfig", ns.cp.kubeconfig, "--namespace", ns.name]
    etl = ["--set", "etls[0].id=gitops", "--set", "etls[0].kind=build",
           "--set", "etls[0].runtime=python3", "--set-string", f"etls[0].code={MD5_CODE}"]
    run(*base, "install", RELEASE, str(REPO / "chart"), *etl)
    cm = ns.kube.request("GET", ns.kube.path("configmaps", "aisetl-etl-gitops"))
    assert cm["data"]["code.py"] == MD5_CODE and cm["metadata"]["labels"]["aisetl.io/etl"]
    ds = ns.kube.request("GET", f"/apis/apps/v1/namespaces/{ns.name}/daemonsets/"
                                f"{RELEASE}-aisetl-target")
    before = ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    run(*base, "upgrade", RELEASE, str(REPO / "chart"), *etl,
        "--set", "extraEnv.AISETL_LOG_LEVEL=debug")
    status = yaml.safe_load(run(*base, "status", RELEASE, "-o", "yaml"))
    assert status["info"]["status"] == "deployed" and status["version"] == 2
    ds = ns.kube.request("GET", f"/apis/apps/v1/namespaces/{ns.name}/daemonsets/"
                                f"{RELEASE}-aisetl-target")
    after = ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert after != before  # the settings changed: the targets roll
