"""The real daemons against the real API server, driven by the ``ais`` CLI.

``aisetl gateway`` and ``aisetl target`` run as subprocesses with the args and
environment of the chart's Deployment and DaemonSet (``helm template``; only
addresses, ports and paths are changed to fit loopback), each with a token of
its own chart ServiceAccount, whose Role the API server enforces (RBAC). So
every API call on the whole path — membership, bucket records, ETL
declarations, status annotations and Events, transformer pods — must be
allowed by the chart's Roles, or this test fails.

No kubelet runs. This test plays its part:

- the target's Pod object is created from the DaemonSet's pod template (its
  labels, annotations and spec), with the ``aisetl.io/port`` annotation, and
  given podIP 127.0.0.1; it is marked Ready once the target's ``/v1/health``
  (the chart's readiness probe) answers 200, as the kubelet would.
- the transformer pod the target creates: the python3 runtime server runs on
  a loopback port with the pod's ``AIS_TARGET_URL`` and the code of the ETL's
  ConfigMap (what the pod mounts); the target's ``AISETL_RUNTIME_PORT`` is set
  to that port (so the pod's containerPort is it), and the pod's status gets
  podIP 127.0.0.1 and Ready. A deleted pod's "container" is stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from aisetl.kube.client import Obj
from aisetl.orchestrator.kubernetes import KubernetesOrchestrator, KubernetesOrchestratorSettings
from tests.k8s.conftest import (
    REPO,
    Kubelet,
    Namespace,
    RuntimeServers,
    eventually,
    free_port,
    kubeconfig_for,
    run,
)
from tests.k8s.support import RELEASE
from tests.support.cluster import http

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

NODE = "node-e2e"
SEED_CODE = """import hashlib

def transform(input_bytes):
    md5 = hashlib.md5()
    md5.update(input_bytes)
    return md5.hexdigest().encode()
"""
SEED_MD5 = "393c6706efb128fbc442d3f7d084a426"  # of b"some text :)\n"
# docs/kubernetes.md, "Declaring an ETL with kubectl"
GITOPS_ETL = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: aisetl-etl-md5          # aisetl-etl-<lowercased id>
  labels: {aisetl.io/etl: "true"}
data:
  id: md5
  kind: build
  runtime: python3
  communication_type: hpush://
  wait_timeout: 2m
  deps.txt: ""
  code.py: |
    import hashlib
    def transform(b):
        return hashlib.md5(b).hexdigest().encode()
"""
TRANSFORMERS = f"app.kubernetes.io/component=transformer,app.kubernetes.io/instance={RELEASE}"


@dataclass
class Chart:
    """What ``helm template`` renders for the release."""

    config: dict[str, str]  # the settings ConfigMap (envFrom of both roles)
    gateway: Obj  # the gateway's pod template
    target: Obj  # the target DaemonSet's pod template


def render(helm: str, namespace: str) -> tuple[str, Chart]:
    """The chart's RBAC objects (YAML) and what the daemons take from it."""
    def show(*templates: str) -> str:
        only = [a for t in templates for a in ("--show-only", f"templates/{t}")]
        return run(helm, "template", RELEASE, str(REPO / "chart"), "--namespace", namespace,
                   *only)

    rbac = show("serviceaccount.yaml", "role.yaml", "rolebinding.yaml")
    docs = [d for d in yaml.safe_load_all(show("configmap.yaml", "gateway-deployment.yaml",
                                               "target-daemonset.yaml")) if d]
    by_kind = {d["kind"]: d for d in docs}
    return rbac, Chart(config=by_kind["ConfigMap"]["data"],
                       gateway=by_kind["Deployment"]["spec"]["template"],
                       target=by_kind["DaemonSet"]["spec"]["template"])


def daemon_argv(container: Obj, env: dict[str, str], overrides: dict[str, str]) -> list[str]:
    """The container's args with ``$(VAR)`` expanded as the kubelet does, and the value
    of each flag in ``overrides`` replaced (or appended)."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
            for a in container["args"]]
    for flag, value in overrides.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return [sys.executable, "-m", "aisetl.cli.daemon", *args]


def daemon_env(chart: Chart, container: Obj, kubeconfig: Path, **extra: str) -> dict[str, str]:
    """The process environment: the chart's envFrom settings and ``env`` names (with the
    values a pod would get through the downward API, passed in ``extra``), KUBECONFIG
    instead of the in-cluster token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(chart.config)
    for e in container.get("env") or []:
        assert e["name"] in extra, f"the chart sets {e['name']}: the test must give it"
    env.update(extra)
    env["KUBECONFIG"] = str(kubeconfig)
    env["AISETL_LOG_LEVEL"] = "debug"
    return env


class Daemon:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path,
                 url: str) -> None:
        self.name, self.url, self.log = name, url, log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.name} log ---\n{self.log.read_text(errors='replace')[-n:]}"

    def health(self) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.proc.returncode})\n{self.tail()}")
        try:
            return http("GET", self.url + "/v1/health", timeout=2)[0]
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in reversed(started):
        d.stop()


async def sh(cmd: str, env: dict[str, str], cwd: Path | None = None,
             timeout: float = 120) -> str:
    """A command line as a user types it (``ais`` is the installed entry point)."""
    proc = await asyncio.create_subprocess_shell(
        cmd, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}: {err.decode()}"
    return out.decode()


def transformer_pods(ns: Namespace, etl_id: str = "") -> list[Obj]:
    """Live transformer pods of the release (of one ETL, if given)."""
    sel = TRANSFORMERS + (f",aisetl.io/etl-id={etl_id}" if etl_id else "")
    doc = ns.kube.request("GET", ns.kube.path("pods"), query={"labelSelector": sel})
    return [p for p in doc.get("items") or [] if not p["metadata"].get("deletionTimestamp")]


async def play_kubelet_for_transformer(ns: Namespace, kubelet: Kubelet,
                                       servers: RuntimeServers, etl_id: str,
                                       runtime_port: int) -> Obj:
    """The transformer pod of ``etl_id`` appears: "run" it and report it Ready."""
    pod = (await eventually(lambda: transformer_pods(ns, etl_id), timeout=30,
                            what=f"transformer pod of {etl_id}"))[0]
    c = pod["spec"]["containers"][0]
    assert c["ports"][0]["containerPort"] == runtime_port
    env = {e["name"]: e.get("value", "") for e in c.get("env") or []}
    cm = pod["metadata"]["ownerReferences"][0]["name"]
    assert {v["name"]: v.get("configMap", {}).get("name")
            for v in pod["spec"]["volumes"]}["code"] == cm
    code = ns.kube.request("GET", ns.kube.path("configmaps", cm))["data"]["code.py"]
    await servers(code, env["AIS_TARGET_URL"], port=runtime_port)
    kubelet.run(pod["metadata"]["name"])  # podIP 127.0.0.1, Ready=True
    return pod


async def test_daemons_with_chart_rbac_serve_the_seed_etl_through_the_cli(
        ns: Namespace, helm: str, kubelet: Kubelet, runtime_server: RuntimeServers,
        daemons: list[Daemon], tmp_path: Path) -> None:
    started = time.monotonic()
    rbac, chart = render(helm, ns.name)
    ns.cp.kubectl("-n", ns.name, "apply", "-f", "-", stdin=rbac)
    gw_kubeconfig = kubeconfig_for(ns, f"{RELEASE}-aisetl-gateway", tmp_path / "gw.kubeconfig")
    tg_kubeconfig = kubeconfig_for(ns, f"{RELEASE}-aisetl-target", tmp_path / "tg.kubeconfig")
    gw_port, tg_port, runtime_port = free_port(), free_port(), free_port()

    # the target's pod, from the DaemonSet's template; scheduled to NODE with an IP
    pod_name = f"{RELEASE}-aisetl-target-e2e01"
    tmpl = chart.target
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod_name, "labels": tmpl["metadata"]["labels"],
                        "annotations": {**tmpl["metadata"].get("annotations", {}),
                                        "aisetl.io/port": str(tg_port)}},
           "spec": {**tmpl["spec"], "nodeName": NODE}}
    ns.kube.request("POST", ns.kube.path("pods"), body=pod)
    kubelet.run(pod_name, ready=False)  # running, readiness probe not yet passed

    gw_container = chart.gateway["spec"]["containers"][0]
    gw_env = daemon_env(chart, gw_container, gw_kubeconfig, POD_NAMESPACE=ns.name)
    gw = Daemon("gateway", daemon_argv(gw_container, gw_env, {
        "--host": "127.0.0.1", "--port": str(gw_port)}), gw_env, tmp_path / "gateway.log",
        f"http://127.0.0.1:{gw_port}")
    daemons.append(gw)

    tg_container = tmpl["spec"]["containers"][0]
    tg_env = daemon_env(chart, tg_container, tg_kubeconfig, K8S_HOST_NAME=NODE,
                        POD_NAME=pod_name, POD_NAMESPACE=ns.name, POD_IP="127.0.0.1",
                        AISETL_RUNTIME_PORT=str(runtime_port))
    tg = Daemon("target", daemon_argv(tg_container, tg_env, {
        "--host": "127.0.0.1", "--port": str(tg_port), "--data": str(tmp_path / "data"),
        "--state": str(tmp_path / "state"),
        "--advertise-url": f"http://127.0.0.1:{tg_port}"}), tg_env,
        tmp_path / "target.log", f"http://127.0.0.1:{tg_port}")
    daemons.append(tg)
    logs = lambda: f"{gw.tail()}\n{tg.tail()}"  # noqa: E731

    try:
        # the target joins as soon as its pod has an IP; then the "kubelet"'s readiness
        # probe passes and the pod turns Ready, which makes it a member for the gateway
        await eventually(lambda: tg.health() == 200, timeout=30, what="target joined")
        kubelet.run(pod_name)
        await eventually(lambda: gw.health() == 200, timeout=30, what="gateway sees target")
        cmap = json.loads(http("GET", gw.url + "/v1/cluster/map")[1])["targets"]
        assert [(t["id"], t["url"], t["node"]) for t in cmap] == [
            (pod_name, f"http://127.0.0.1:{tg_port}", NODE)]

        bin_dir = str(Path(sys.executable).parent)  # where pip installed `ais`
        env = {**os.environ, "AIS_ENDPOINT": gw.url,
               "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        assert await sh("ais create bucket transform", env) == \
            '"ais://transform" bucket created\n'
        await sh('echo "some text :)" | ais put - transform/shard.in', env)
        assert await sh("ais get transform/shard.in -", env) == "some text :)\n"

        # build: the call returns once the transformer pod the target creates is Ready
        (tmp_path / "code.py").write_text(SEED_CODE)
        build = asyncio.ensure_future(
            sh("ais etl build --from-file=code.py --runtime=python3", env, cwd=tmp_path))
        tpod = await play_kubelet_for_transformer(ns, kubelet, runtime_server,
                                                  "", runtime_port)
        etl_id = (await asyncio.wait_for(build, 60)).strip()
        labels = tpod["metadata"]["labels"]
        assert labels["aisetl.io/etl-id"] == etl_id and labels["aisetl.io/target"] == pod_name
        assert tpod["spec"]["nodeName"] == NODE
        assert f"http://127.0.0.1:{tg_port}/v1/etl/objects/" in \
            {e["name"]: e.get("value") for e in tpod["spec"]["containers"][0]["env"]}[
                "AIS_TARGET_URL"]

        out = await sh(f"ais etl object {etl_id} transform/shard.in -", env)
        assert out == SEED_MD5 == hashlib.md5(b"some text :)\n").hexdigest()
        assert etl_id in await sh("ais etl ls", env)

        cm = f"aisetl-etl-{etl_id.lower()}"
        described = ns.cp.kubectl("-n", ns.name, "describe", "configmap", cm).stdout
        assert "TransformerReady" in described and f"target {pod_name}: Ready" in described

        stop_started = time.monotonic()
        assert await sh(f"ais etl stop {etl_id}", env) == \
            "ETL containers stopped successfully.\n"
        # the gateway waits (30 s at most) until no target runs it: stopped means stopped
        assert json.loads(http("GET", tg.url + "/v1/etl/local")[1]) == {}
        assert time.monotonic() - stop_started < 20
        assert ns.cp.kubectl("-n", ns.name, "get", "configmap", cm,
                             check=False).returncode != 0
        await eventually(lambda: not transformer_pods(ns, etl_id), what="transformer deleted")
        await runtime_server.stop(runtime_port)  # the kubelet stops the deleted pod

        # GitOps: a declaration applied with kubectl (as a user: admin) starts a
        # transformer on the target like one from the API
        ns.cp.kubectl("-n", ns.name, "apply", "-f", "-", stdin=GITOPS_ETL)
        gpod = await play_kubelet_for_transformer(ns, kubelet, runtime_server, "md5",
                                                  runtime_port)
        assert gpod["spec"]["nodeName"] == NODE
        assert gpod["metadata"]["labels"]["aisetl.io/target"] == pod_name

        def ready() -> bool:
            return "TransformerReady" in ns.cp.kubectl("-n", ns.name, "describe", "configmap",
                                                       "aisetl-etl-md5").stdout

        await eventually(ready, what="md5 Ready event")
        out = await sh("ais etl object md5 transform/shard.in -", env)
        assert out == SEED_MD5
        ns.cp.kubectl("-n", ns.name, "delete", "configmap", "aisetl-etl-md5")
        await eventually(lambda: not transformer_pods(ns, "md5"), what="md5 transformer gone")
    except BaseException:
        print(logs(), file=sys.stderr)
        raise
    for d in daemons:
        assert d.proc.poll() is None, f"{d.name} died\n{d.tail()}"
    print(f"\ndaemons e2e took {time.monotonic() - started:.1f}s", file=sys.stderr)


async def test_a_stopped_supervisor_is_not_kept_alive_by_a_pod_change() -> None:
    """Found by the test above: reconcile cancels an ETL's supervisor while the garbage
    collector deletes its pod; the cancel and the informer's wakeup land in the same
    loop iteration. ``asyncio.wait_for`` (Python 3.11) then returned normally, the
    supervisor saw "the pod is being deleted", restarted the transformer forever, and
    held the reconcile lock. ``changed()`` must let the cancel through."""
    orch = KubernetesOrchestrator(None, KubernetesOrchestratorSettings())  # type: ignore[arg-type]
    orch._loop = asyncio.get_running_loop()
    task = asyncio.create_task(orch.changed(30))
    await asyncio.sleep(0)  # waiting now
    orch._wake()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
