"""``helm upgrade`` rolls the target DaemonSet one node at a time, with the real
DaemonSet controller (issue 5: "rolls the targets one at a time without losing
stored objects").

What runs: the session's etcd + kube-apiserver, plus a second
kube-controller-manager with only the ``daemonset`` controller
(``daemonset_controller``). Three Node objects (Ready, no taints, a label that
the release's ``target.nodeSelector`` selects) stand in for storage nodes.

What this test plays itself, because no kubelet and no scheduler run: the
scheduler (it binds each pod to the node named in the nodeAffinity the
DaemonSet controller gives it) and the kubelet (a pod on a node becomes
Running + Ready with podIP 127.0.0.x after ``KUBELET_DELAY``; a pod being
deleted is removed after ``KUBELET_DELAY``, as a kubelet does once its
containers have stopped). Nothing else: which pod to delete, when, and when to
create its replacement is decided by the real controller from the chart's
``updateStrategy``.

What it proves: every state of the release's target pods, as the API server's
watch reports them (each write, in order), from the end of ``helm install``
until the upgraded pods are all Ready, has at most one node without an
available target (maxUnavailable 1) and never two target pods on one node
(maxSurge 0, so a node's data directory has one owner at a time); the roll
does happen (some node is unavailable at some point) and ends with exactly
one Ready pod of the new template on every node. Data survival, as far as an
API server can show it: the replacement pod on each node mounts the same data
volume as the pod it replaces (the same hostPath, or the same claim with the
node-name ``subPathExpr``) at the same path, and the target gets the same
``--data`` directory.

What it does not prove: that the files themselves survive. That needs a real
kubelet and container runtime (the kind end-to-end test, ``hack/kind-e2e.sh``);
here no container runs and no volume is mounted. Nor does it exercise
readiness probes: "Ready" is what this test says, not what ``/v1/health``
answers.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from aisetl.kube.client import Kube, KubeError, KubeSettings, Obj
from tests.k8s.conftest import REPO, Kubelet, Namespace, run
from tests.k8s.support import RELEASE

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]

NODES = 3
KUBELET_DELAY = 0.4
"""Seconds the simulated kubelet takes to make a new pod Ready, and to finish a deleted one."""
SELECTOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=target"
DS_NAME = f"{RELEASE}-aisetl-target"


def _ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _deleting(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _affinity_node(pod: Obj) -> str:
    """The node a DaemonSet pod is meant for (the controller sets nodeAffinity, the
    scheduler binds)."""
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for term in terms:
        for f in term.get("matchFields") or []:
            if f["key"] == "metadata.name" and f["operator"] == "In":
                return str(f["values"][0])
    raise AssertionError(f"no node in the affinity of {pod['metadata']['name']}: {terms}")


@dataclass
class Sample:
    t: float
    unavailable: list[str]  # nodes without a Ready target pod that is not being deleted
    pods_per_node: dict[str, int]  # every target pod object, terminating ones included
    event: str


@dataclass
class Harness:
    """Watches the release's target pods and plays scheduler and kubelet for them."""

    kube: Kube
    kubelet: Kubelet
    nodes: list[str]
    pods: dict[str, Obj] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    recording: bool = False
    events: queue.Queue[Obj | BaseException] = field(default_factory=queue.Queue)
    ready_due: dict[str, float] = field(default_factory=dict)
    delete_due: dict[str, float] = field(default_factory=dict)
    bound: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    streams: list[Any] = field(default_factory=list)  # open watch responses

    # --- the watch: every write to a target pod, in order ---------------------------------
    def _watch(self, rv: str) -> None:
        watcher = Kube(self.kube.api, self.kube.namespace, KubeSettings(watch_timeout=5))
        try:
            while not self.stop.is_set():  # the server ends each stream after 5 s: resume
                for ev in watcher.watch(self.kube.path("pods"),
                                        {"labelSelector": SELECTOR, "resourceVersion": rv},
                                        self.streams.append):
                    if ev["type"] == "ERROR":
                        raise AssertionError(f"watch error: {ev['object']}")
                    rv = ev["object"]["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self.events.put(ev)
        except BaseException as e:  # reported by the main loop
            if not self.stop.is_set():
                self.events.put(e)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        doc = self.kube.request("GET", self.kube.path("pods"),
                                query={"labelSelector": SELECTOR})
        for p in doc["items"]:
            self.pods[p["metadata"]["name"]] = p
        thread = threading.Thread(target=self._watch, args=(doc["metadata"]["resourceVersion"],),
                                  name="rollout-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.stop.set()
            for stream in self.streams:  # unblock the read at once (urllib3 >= 2.3)
                with contextlib.suppress(Exception):
                    getattr(stream, "shutdown", lambda: None)()
            thread.join(15)  # the current stream ends within its 5 s timeout
            assert not thread.is_alive(), "pod watch did not stop"

    # --- state ----------------------------------------------------------------------------
    def unavailable(self) -> list[str]:
        available = {p["spec"].get("nodeName") for p in self.pods.values()
                     if _ready(p) and not _deleting(p)}
        return [n for n in self.nodes if n not in available]

    def pods_per_node(self) -> dict[str, int]:
        count = dict.fromkeys(self.nodes, 0)
        for p in self.pods.values():
            node = p["spec"].get("nodeName") or _affinity_node(p)
            count[node] = count.get(node, 0) + 1
        return count

    def on_node(self, node: str) -> list[Obj]:
        return [p for p in self.pods.values() if p["spec"].get("nodeName") == node]

    # --- scheduler and kubelet ------------------------------------------------------------
    def _react(self, now: float) -> None:
        for name, p in self.pods.items():
            node = p["spec"].get("nodeName")
            if _deleting(p):
                self.delete_due.setdefault(name, now + KUBELET_DELAY)
            elif not node and name not in self.bound:
                self.bound.add(name)  # the scheduler binds at once
                target = _affinity_node(p)
                self.kube.request("POST", self.kube.path("pods", name) + "/binding", body={
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": target}})
            elif node and not _ready(p):
                self.ready_due.setdefault(name, now + KUBELET_DELAY)

    def _due(self, now: float) -> None:
        for name, due in list(self.ready_due.items()):
            p = self.pods.get(name)
            if p is None or _deleting(p):
                del self.ready_due[name]
            elif due <= now:
                del self.ready_due[name]
                ip = f"127.0.0.{2 + self.nodes.index(p['spec']['nodeName'])}"
                self._ignore_gone(functools.partial(self.kubelet.run, name, ip=ip))
        for name, due in list(self.delete_due.items()):
            if name not in self.pods:
                del self.delete_due[name]
            elif due <= now:
                del self.delete_due[name]
                self._ignore_gone(functools.partial(  # the containers have stopped
                    self.kube.request, "DELETE", self.kube.path("pods", name),
                    body={"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}))

    @staticmethod
    def _ignore_gone(call: Callable[[], Any]) -> None:
        try:
            call()
        except KubeError as e:
            if e.status not in (404, 409):
                raise

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Apply watch events, react like scheduler and kubelet, record, until ``done()``."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self._react(now)
            self._due(now)
            if done():
                return
            assert now < deadline, (f"timed out after {timeout}s waiting for {what}; pods: "
                                    f"{[(n, p['spec'].get('nodeName'), _ready(p), _deleting(p)) for n, p in self.pods.items()]}")  # noqa: E501
            dues = [*self.ready_due.values(), *self.delete_due.values()]
            wait = max(0.0, min([0.1, *(d - now for d in dues)]))
            try:
                ev = self.events.get(timeout=wait)
            except queue.Empty:
                continue
            if isinstance(ev, BaseException):
                raise AssertionError(f"pod watch failed: {ev!r}") from ev
            obj = ev["object"]
            name = obj["metadata"]["name"]
            if ev["type"] == "DELETED":
                self.pods.pop(name, None)
            else:
                self.pods[name] = obj
            if self.recording:
                self.samples.append(Sample(time.monotonic(), self.unavailable(),
                                           self.pods_per_node(), f"{ev['type']} {name}"))


def _data_volume(pod: Obj) -> tuple[Any, ...]:
    """What decides where a target keeps its objects: the data volume's source, its
    mount (path, sub-path expression resolved with the pod's node) and ``--data``."""
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "data")
    source = {k: v for k, v in vol.items() if k != "name"}
    target = next(c for c in pod["spec"]["containers"] if c["name"] == "target")
    mount = next(m for m in target["volumeMounts"] if m["name"] == "data")
    sub = mount.get("subPathExpr", "").replace("$(K8S_HOST_NAME)", pod["spec"]["nodeName"])
    host_env = next(e for e in target["env"] if e["name"] == "K8S_HOST_NAME")
    assert host_env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = target["args"]
    return (yaml.safe_dump(source, sort_keys=True), mount["mountPath"], sub,
            args[args.index("--data") + 1])


@pytest.mark.parametrize("persistence", ["hostPath", "persistentVolumeClaim"])
def test_helm_upgrade_rolls_targets_one_node_at_a_time(
        ns: Namespace, helm: str, kubelet: Kubelet, daemonset_controller: Any,
        persistence: str, tmp_path: Path) -> None:
    nodes = [f"{ns.name}-node-{i}" for i in range(NODES)]
    label = "aisetl.io/rollout-test"
    values = {"target": {"nodeSelector": {label: ns.name}},
              "persistence": {"hostPath": {"enabled": persistence == "hostPath"},
                              "persistentVolumeClaim": {
                                  "enabled": persistence == "persistentVolumeClaim"}}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    base = [helm, "--kubeconfig", ns.cp.kubeconfig, "--namespace", ns.name]
    chart = [str(REPO / "chart"), "-f", str(tmp_path / "values.yaml")]
    h = Harness(ns.kube, kubelet, nodes)
    ds_path = f"/apis/apps/v1/namespaces/{ns.name}/daemonsets/{DS_NAME}"
    try:
        for i, node in enumerate(nodes):
            ns.kube.request("POST", "/api/v1/nodes", body={
                "metadata": {"name": node, "labels": {label: ns.name,
                                                      "kubernetes.io/hostname": node}}})
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            ns.kube.request("PATCH", f"/api/v1/nodes/{node}/status", body={"status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": f"127.0.0.{2 + i}"}]}},
                content_type="application/merge-patch+json")
            # admission gives a new Node the not-ready:NoSchedule taint, which the node
            # lifecycle controller removes once the node is Ready; it does not run here
            ns.kube.request("PATCH", f"/api/v1/nodes/{node}", body={"spec": {"taints": None}},
                            content_type="application/merge-patch+json")
            assert not ns.kube.request("GET", f"/api/v1/nodes/{node}")["spec"].get("taints")
        with h.watching():
            run(*base, "install", RELEASE, *chart)
            h.run_until(lambda: all(len(h.on_node(n)) == 1 and _ready(h.on_node(n)[0])
                                    for n in nodes) and not h.unavailable(),
                        60, "one Ready target per node after install")
            old = {n: h.on_node(n)[0] for n in nodes}
            old_checksum = {p["metadata"]["annotations"]["checksum/config"]
                            for p in old.values()}
            assert len(old_checksum) == 1

            h.recording = True
            started = time.monotonic()
            upgrade = subprocess.Popen(
                [*base, "upgrade", RELEASE, *chart, "--set", "extraEnv.AISETL_LOG_LEVEL=debug"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                new_checksum: list[str] = []

                def rolled() -> bool:
                    if upgrade.poll() is None:
                        return False
                    if not new_checksum:
                        ds = ns.kube.request("GET", ds_path)
                        new_checksum.append(
                            ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
                    return all(len(pods := h.on_node(n)) == 1 and _ready(pods[0])
                               and not _deleting(pods[0])
                               and pods[0]["metadata"]["annotations"]["checksum/config"]
                               == new_checksum[0] for n in nodes)

                h.run_until(rolled, 90, "every node rolled to the new template")
            finally:
                if upgrade.poll() is None:
                    upgrade.kill()
                _out, err = upgrade.communicate(timeout=30)
            assert upgrade.returncode == 0, f"helm upgrade failed: {err}"
            duration = time.monotonic() - started
            h.recording = False

            new = {n: h.on_node(n)[0] for n in nodes}
            assert new_checksum[0] not in old_checksum  # the template changed
            worst = max(len(s.unavailable) for s in h.samples)
            crowded = max(max(s.pods_per_node.values()) for s in h.samples)
            # the nodes in the order they lost their available target
            order: list[str] = []
            before: set[str] = set()
            for s in h.samples:
                order += sorted(set(s.unavailable) - before)
                before = set(s.unavailable)
            print(f"\nrollout ({persistence}): {len(h.samples)} observed states in "
                  f"{duration:.1f}s, max unavailable {worst}, max pods on a node {crowded}, "
                  f"nodes down in order {order}", file=sys.stderr)
            assert worst <= 1, [(s.event, s.unavailable) for s in h.samples]
            assert crowded == 1, [(s.event, s.pods_per_node) for s in h.samples]
            assert worst == 1, "no node was ever unavailable: did the pods roll?"
            assert sorted(order) == sorted(nodes), order  # every node rolled, each once

            for n in nodes:
                assert new[n]["metadata"]["uid"] != old[n]["metadata"]["uid"]
                assert (new[n]["metadata"]["labels"]["controller-revision-hash"]
                        != old[n]["metadata"]["labels"]["controller-revision-hash"])
                assert _data_volume(new[n]) == _data_volume(old[n]), n
            if persistence == "hostPath":
                assert {_data_volume(p)[0] for p in new.values()} == {
                    yaml.safe_dump({"hostPath": {"path": "/var/lib/aisetl",
                                                 "type": "DirectoryOrCreate"}})}
            else:  # one claim, one sub-directory per node
                assert sorted(_data_volume(p)[2] for p in new.values()) == sorted(nodes)

            def ds_settled() -> bool:
                st = ns.kube.request("GET", ds_path)
                s = st.get("status") or {}
                return (s.get("observedGeneration") == st["metadata"]["generation"]
                        and s.get("updatedNumberScheduled") == NODES
                        and s.get("numberAvailable") == NODES
                        and not s.get("numberUnavailable"))

            h.run_until(ds_settled, 30, "DaemonSet status: all updated and available")

            # uninstall; the simulated kubelet finishes the pods the garbage collector deletes
            run(*base, "uninstall", RELEASE)
            h.run_until(lambda: not h.pods, 60, "target pods gone after uninstall")
    finally:
        for node in nodes:
            with contextlib.suppress(KubeError):
                ns.kube.request("DELETE", f"/api/v1/nodes/{node}")
