"""What the chart renders for which values: gates, contracts with the Python code, failures.

The names, labels, env and RBAC checked here are the contract with
control/kubernetes and orchestrator/kubernetes (the sidecar selects target pods
by app.kubernetes.io/instance + app.kubernetes.io/component=target and reads
ETL ConfigMaps named aisetl-etl-<lowercased id>).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    CHART,
    FULLNAME,
    MONITORING_API,
    NAMESPACE,
    RELEASE,
    HelmFailed,
    find,
    one,
    run_helm,
)

pytestmark = pytest.mark.chart

MONITORING = {"values": ("monitoring.yaml",), "api_versions": (MONITORING_API,)}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def _dashboards(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in find(objects, "ConfigMap")
        if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]


# --- monitoring gates -------------------------------------------------------


def test_monitoring_off_by_default_renders_no_servicemonitor_rule_or_dashboard(render: Any) -> None:
    objects = render(api_versions=(MONITORING_API,))
    assert not find(objects, "ServiceMonitor")
    assert not find(objects, "PrometheusRule")
    assert not _dashboards(objects)


def test_monitoring_on_renders_servicemonitor_rule_and_dashboard(render: Any) -> None:
    objects = render(**MONITORING)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The selector picks both the gateway and the target Service.
    services = find(objects, "Service")
    selected = [
        s["metadata"]["name"]
        for s in services
        if all(
            s["metadata"]["labels"].get(k) == v
            for k, v in monitor["spec"]["selector"]["matchLabels"].items()
        )
        and s["metadata"]["labels"]["app.kubernetes.io/component"]
        in monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    ]
    assert sorted(selected) == [f"{FULLNAME}-gateway", f"{FULLNAME}-target"]
    assert all(p["name"] == "http" for s in services for p in s["spec"]["ports"])

    rule = one(objects, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"AisetlTargetDown", "AisetlEtlErrorRatioHigh", "AisetlTransformerRestarting"} <= alerts

    (dashboard,) = _dashboards(objects)
    assert yaml.safe_load(yaml.safe_dump(dashboard))["data"]["aisetl.json"].lstrip().startswith("{")


def test_monitoring_enabled_without_the_operator_api_renders_no_custom_resources(
    render: Any,
) -> None:
    objects = render(values=("monitoring.yaml",))
    assert not find(objects, "ServiceMonitor")
    assert not find(objects, "PrometheusRule")
    # The dashboard is a plain ConfigMap: it needs no CRD.
    assert len(_dashboards(objects)) == 1


def _render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it, without a cluster.

    `helm template` does not render NOTES.txt and `helm install --dry-run`
    contacts a cluster with helm 3, so a copy of the chart renders the notes
    into a ConfigMap through `tpl`.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}\n'
    )
    out = run_helm(
        helm,
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/zz-notes.yaml",
        *args,
    )
    return str(yaml.safe_load(out)["data"]["notes"])


def test_notes_show_the_gateway_and_the_seed_example(helm: str, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path)
    assert "AIS_ENDPOINT=http://smoke-aisetl-gateway.aisetl-test.svc:8080" in notes
    assert "ais etl build --from-file=/tmp/code.py --runtime=python3" in notes
    assert "helm test smoke -n aisetl-test" in notes
    assert "WARNING" not in notes


def test_notes_warn_when_monitoring_is_enabled_without_the_operator_api(
    helm: str, tmp_path: Path
) -> None:
    notes = _render_notes(helm, tmp_path, "--set", "monitoring.serviceMonitor.enabled=true")
    assert "does not serve monitoring.coreos.com/v1" in notes
    quiet = _render_notes(
        helm,
        tmp_path / "with-api",
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--api-versions",
        MONITORING_API,
    )
    assert "WARNING" not in quiet


# --- RBAC -------------------------------------------------------------------


def test_every_role_rule_has_a_comment_in_the_template_source() -> None:
    lines = (CHART / "templates" / "role.yaml").read_text().splitlines()
    rule_starts = [i for i, line in enumerate(lines) if re.match(r"^\s*- apiGroups:", line)]
    assert len(rule_starts) >= 10
    for i in rule_starts:
        before = lines[i - 1].strip()
        assert before.startswith("#") and len(before) > 10, (
            f"role.yaml:{i + 1}: rule without a comment saying which code path needs it"
        )


def _rules(objects: list[dict[str, Any]], component: str) -> set[tuple[str, str, str]]:
    role = one(objects, "Role", f"{FULLNAME}-{component}")
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_target_role_grants_what_the_orchestrator_and_control_store_need(render: Any) -> None:
    rules = _rules(render(), "target")
    needed = {
        *(
            ("", "configmaps", v)
            for v in ("get", "list", "watch", "create", "update", "patch", "delete")
        ),
        *(("", "pods", v) for v in ("get", "list", "watch", "create", "delete")),
        ("", "pods/log", "get"),
        ("", "events", "create"),
        ("", "events", "patch"),
    }
    assert needed <= rules, needed - rules
    assert not any(verb == "*" or resource == "*" for _, resource, verb in rules)
    assert not any(resource == "secrets" for _, resource, _ in rules)


def test_gateway_role_cannot_create_pods(render: Any) -> None:
    rules = _rules(render(), "gateway")
    assert {
        ("", "configmaps", "create"),
        ("", "configmaps", "delete"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
    } <= rules
    assert not {r for r in rules if r[1] == "pods" and r[2] in ("create", "delete")}
    assert not {r for r in rules if r[1] == "pods/log"}


def test_each_role_is_bound_to_its_own_service_account(render: Any) -> None:
    objects = render()
    for component, workload in (("gateway", "Deployment"), ("target", "DaemonSet")):
        binding = one(objects, "RoleBinding", f"{FULLNAME}-{component}")
        account = one(objects, workload)["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["roleRef"]["name"] == f"{FULLNAME}-{component}"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
        assert one(objects, "ServiceAccount", account)


def test_rbac_create_false_renders_no_roles(render: Any) -> None:
    objects = render("--set", "rbac.create=false")
    assert not find(objects, "Role") and not find(objects, "RoleBinding")


# --- target DaemonSet and gateway Deployment --------------------------------


def test_daemonset_sets_k8s_host_name_from_spec_node_name(render: Any) -> None:
    daemonset = one(render(), "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert env["K8S_HOST_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert container["args"] == [
        "target",
        "--host",
        "0.0.0.0",
        "--port",
        "8081",
        "--data",
        "/var/lib/aisetl/data",
        "--control",
        "kubernetes",
        "--orchestrator",
        "kubernetes",
        "--id",
        "$(POD_NAME)",
        "--advertise-url",
        "http://$(POD_IP):8081",
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/health", "port": "http"}


def test_settings_configmap_gives_release_and_runtime_images(render: Any) -> None:
    objects = render()
    config = one(objects, "ConfigMap", f"{FULLNAME}-config")
    assert config["data"] == {
        "AISETL_RELEASE": RELEASE,
        "AISETL_RUNTIME_IMAGE_PYTHON3": "aisetl/runtime-python3:0.1.0",
        "AISETL_RUNTIME_IMAGE_PYTHON2": "aisetl/runtime-python2:0.1.0",
    }
    for workload in ("Deployment", "DaemonSet"):
        (container,) = one(objects, workload)["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": f"{FULLNAME}-config"}}]
        assert container["image"] == "aisetl/aisetl:0.1.0"


def test_gateway_runs_the_gateway_role_with_the_kubernetes_control_store(render: Any) -> None:
    deployment = one(render(), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "gateway",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--control",
        "kubernetes",
    ]
    assert (
        _env(container)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.namespace"
    )


def test_target_pods_carry_the_labels_the_sidecar_selects_members_by(render: Any) -> None:
    labels = one(render(), "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/component"] == "target"
    gateway_labels = one(render(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert gateway_labels["app.kubernetes.io/component"] == "gateway"


def test_upgrade_rolls_one_target_at_a_time_and_never_two_on_a_node(render: Any) -> None:
    strategy = one(render(), "DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }


def test_checksum_config_changes_when_the_settings_change(render: Any) -> None:
    def checksum(objects: list[dict[str, Any]], kind: str) -> str:
        return one(objects, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    before, after = render(), render("--set", "extraEnv.AISETL_LOG_LEVEL=debug")
    for kind in ("Deployment", "DaemonSet"):
        assert re.fullmatch(r"[0-9a-f]{64}", checksum(before, kind))
        assert checksum(before, kind) != checksum(after, kind)
    # An ETL declaration is not part of the settings: targets watch it, no roll.
    with_etl = render(values=("etls.yaml",))
    assert checksum(with_etl, "DaemonSet") == checksum(before, "DaemonSet")


def test_hostpath_is_the_default_data_volume(render: Any) -> None:
    spec = one(render(), "DaemonSet")["spec"]["template"]["spec"]
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data["hostPath"] == {"path": "/var/lib/aisetl", "type": "DirectoryOrCreate"}
    assert not find(render(), "PersistentVolumeClaim")


def test_pvc_persistence_mounts_the_claim_with_the_node_name_as_sub_path(render: Any) -> None:
    objects = render(values=("pvc.yaml",))
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    spec = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    data = next(v for v in spec["volumes"] if v["name"] == "data")
    assert data == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
    }
    for container in spec["containers"] + spec["initContainers"]:
        mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
        assert mount["subPathExpr"] == "$(K8S_HOST_NAME)"
        assert (
            _env(container)["K8S_HOST_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "spec.nodeName"
        )


def test_existing_claim_is_used_and_not_created(render: Any) -> None:
    objects = render(
        "--set", "persistence.persistentVolumeClaim.existingClaim=mine", values=("pvc.yaml",)
    )
    assert not find(objects, "PersistentVolumeClaim")
    spec = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "mine"}} in spec["volumes"]


def test_pods_run_non_root_with_read_only_root_and_no_capabilities(render: Any) -> None:
    objects = render()
    pods = [one(objects, k)["spec"]["template"]["spec"] for k in ("Deployment", "DaemonSet")]
    pods.append(one(objects, "Pod")["spec"])
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
    # The one exception: the init container that hands the data dir to 65532.
    (init,) = one(objects, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert "chown 65532:65532" in init["command"][-1]


# --- values that contradict each other --------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "persistence.persistentVolumeClaim.enabled=true"],
            "persistence.hostPath.enabled and persistence.persistentVolumeClaim.enabled"
            " are both true",
        ),
        (
            ["--set", "persistence.hostPath.enabled=false"],
            "persistence.hostPath.enabled and persistence.persistentVolumeClaim.enabled"
            " are both false",
        ),
        (
            [
                "--set-json",
                'etls=[{"id":"Md5","kind":"build","code":"x","runtime":"python3"},'
                '{"id":"md5","kind":"build","code":"y","runtime":"python3"}]',
            ],
            'two entries have the id "md5"',
        ),
        (
            ["--set-json", 'etls=[{"id":"md5_v2","kind":"build","code":"x","runtime":"python3"}]'],
            'id "md5_v2" cannot name a Kubernetes object',
        ),
        (
            [
                "--set-json",
                'etls=[{"id":"i","kind":"init","communicationType":"hpush://",'
                '"spec":"metadata:\\n  annotations:\\n    communication_type: hrev://\\n"}]',
            ],
            'communicationType "hpush://" contradicts the spec annotation communication_type "hrev://"',
        ),
        (
            [
                "--set-json",
                'etls=[{"id":"i","kind":"init",'
                '"spec":"metadata:\\n  annotations:\\n    communication_type: hfoo://\\n"}]',
            ],
            'communication type "hfoo://" is not one of',
        ),
    ],
    ids=[
        "hostpath-and-pvc",
        "no-persistence",
        "duplicate-etl-id",
        "underscore-etl-id",
        "comm-type-contradicts-spec",
        "bad-comm-type-in-spec",
    ],
)
def test_contradicting_values_fail_with_a_clear_message(
    render_text: Any, args: list[str], message: str
) -> None:
    with pytest.raises(HelmFailed, match=re.escape(message)):
        render_text(*args)


# --- values.schema.json -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--set", "unknownKey=1"], "unknownKey"),
        (["--set", "gateway.replica=2"], "replica"),
        (
            [
                "--set-json",
                'etls=[{"id":"a","kind":"build","code":"x","runtime":"python3",'
                '"communicationType":"http://"}]',
            ],
            "communicationType",
        ),
        (["--set-json", 'etls=[{"id":"-a","kind":"build","code":"x","runtime":"python3"}]'], "id"),
        (["--set-json", 'etls=[{"id":"a","kind":"build","runtime":"python3"}]'], "code"),
        (["--set-json", 'etls=[{"id":"a","kind":"push","code":"x"}]'], "kind"),
        (
            [
                "--set-json",
                'etls=[{"id":"a","kind":"build","code":"x","runtime":"python3",'
                '"waitTimeout":"2 min"}]',
            ],
            "waitTimeout",
        ),
        (["--set", "extraEnv.AISETL_RELEASE=x"], "AISETL_RELEASE"),
        (["--set", "persistence.hostPath.type=File"], "type"),
    ],
    ids=[
        "unknown-top-level-key",
        "unknown-nested-key",
        "bad-comm-type",
        "bad-id",
        "build-without-code",
        "bad-kind",
        "bad-wait-timeout",
        "reserved-env",
        "bad-hostpath-type",
    ],
)
def test_values_schema_rejects(render_text: Any, args: list[str], culprit: str) -> None:
    # Match the schema failure and the offending key, not one helm version's wording.
    with pytest.raises(HelmFailed, match="specifications of the schema") as failure:
        render_text(*args)
    assert culprit in str(failure.value)


def test_values_schema_accepts_every_documented_value_file(render_text: Any) -> None:
    for name in ("full.yaml", "monitoring.yaml", "pvc.yaml", "etls.yaml", "no-networkpolicy.yaml"):
        render_text(values=(name,))


# --- ETL ConfigMaps from values ---------------------------------------------


def test_etls_in_values_render_the_configmaps_the_sidecar_watches(render: Any) -> None:
    objects = render(values=("etls.yaml",))
    etls = {
        o["metadata"]["name"]: o
        for o in find(objects, "ConfigMap")
        if o["metadata"]["labels"].get("aisetl.io/etl") == "true"
    }
    assert sorted(etls) == ["aisetl-etl-jgheoo89gg", "aisetl-etl-md5-init", "aisetl-etl-py2-echo"]
    for cm in etls.values():
        labels = cm["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "aisetl"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert cm["metadata"]["namespace"] == NAMESPACE

    build = etls["aisetl-etl-jgheoo89gg"]["data"]
    assert build["id"] == "JGHEoo89gg"
    assert (build["kind"], build["runtime"]) == ("build", "python3")
    assert "md5.hexdigest().encode()" in build["code.py"]
    assert build["deps.txt"] == "torch==1.6.0\ntorchvision==0.7.0\n"
    assert (build["communication_type"], build["wait_timeout"]) == ("hpush://", "2m")
    assert "spec.yaml" not in build

    py2 = etls["aisetl-etl-py2-echo"]["data"]
    assert (py2["id"], py2["runtime"], py2["deps.txt"]) == ("Py2-echo", "python2", "")
    assert (py2["communication_type"], py2["wait_timeout"]) == ("hpull://", "5m")

    init = etls["aisetl-etl-md5-init"]["data"]
    assert init["kind"] == "init"
    assert set(init) == {"id", "kind", "spec.yaml", "communication_type", "wait_timeout"}
    # Defaults come from the spec's annotations; the spec is kept as written.
    assert (init["communication_type"], init["wait_timeout"]) == ("hrev://", "3m")
    assert init["spec.yaml"].startswith("apiVersion: v1\nkind: Pod\n")
    assert "command: ['/code/server.py'" in init["spec.yaml"]


def test_no_etls_by_default(render: Any) -> None:
    assert not [
        o for o in find(render(), "ConfigMap") if o["metadata"]["labels"].get("aisetl.io/etl")
    ]


# --- NetworkPolicy ----------------------------------------------------------


def test_transformers_accept_traffic_from_targets_and_hpull_ones_from_anywhere(render: Any) -> None:
    objects = render()
    policies = {p["metadata"]["name"]: p["spec"] for p in find(objects, "NetworkPolicy")}
    base = policies[f"{FULLNAME}-transformer"]
    assert base["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "aisetl",
        "app.kubernetes.io/component": "transformer",
    }
    assert base["policyTypes"] == ["Ingress"]
    (peer,) = base["ingress"][0]["from"]
    target_labels = one(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= target_labels.items()
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "target"

    hpull = policies[f"{FULLNAME}-transformer-hpull"]
    assert hpull["podSelector"]["matchLabels"]["aisetl.io/comm-type"] == "hpull"
    assert hpull["ingress"] == [{}]


def test_hpull_clients_can_be_restricted(render: Any) -> None:
    objects = render(values=("full.yaml",), api_versions=(MONITORING_API,))
    hpull = one(objects, "NetworkPolicy", f"{FULLNAME}-transformer-hpull")
    assert hpull["spec"]["ingress"] == [
        {"from": [{"namespaceSelector": {"matchLabels": {"aisetl.io/client": "true"}}}]}
    ]


def test_networkpolicy_off_renders_none(render: Any) -> None:
    assert not find(render(values=("no-networkpolicy.yaml",)), "NetworkPolicy")


# --- helm test --------------------------------------------------------------


def test_helm_test_pod_runs_the_seed_md5_flow_against_the_gateway_service(render: Any) -> None:
    objects = render()
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "aisetl/aisetl:0.1.0"
    gateway = one(objects, "Service", f"{FULLNAME}-gateway")
    assert _env(container)["AIS_ENDPOINT"]["value"] == (
        f"http://{gateway['metadata']['name']}.{NAMESPACE}.svc:{gateway['spec']['ports'][0]['port']}"
    )
    script = container["command"][-1]
    steps = [
        'ais create bucket "$bucket"',
        'echo "some text :)" | ais put - "$bucket/shard.in"',
        "ais etl build --from-file=/tmp/code.py --runtime=python3",
        'ais etl object "$id" "$bucket/shard.in" -',
        "393c6706efb128fbc442d3f7d084a426",
        'ais etl stop "$id"\n',
    ]
    positions = [script.index(step) for step in steps]
    assert positions == sorted(positions)
    assert container["command"][:2] == ["/bin/sh", "-ec"]
