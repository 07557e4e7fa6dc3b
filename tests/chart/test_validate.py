"""The chart lints and renders valid Kubernetes objects for every supported version.

``kubernetes-validate --strict`` checks each rendered object against the
OpenAPI schema of Kubernetes 1.29 (the chart's kubeVersion floor), 1.33 and
1.35, rejecting unknown fields. ServiceMonitor and PrometheusRule are custom
resources of the Prometheus Operator, whose schemas kubernetes-validate does
not ship: they are left out of that check (test_gates.py checks their shape).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, MONITORING_API, VALUES, run_helm

pytestmark = pytest.mark.chart

KUBERNETES_VERSIONS = ["1.29", "1.33", "1.35"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# name -> (values files, extra API versions the "cluster" serves)
VALUE_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "defaults": ((), ()),
    "monitoring": (("monitoring.yaml",), (MONITORING_API,)),
    "pvc": (("pvc.yaml",), ()),
    "etls": (("etls.yaml",), ()),
    "no-networkpolicy": (("no-networkpolicy.yaml",), ()),
    "full": (("full.yaml",), (MONITORING_API,)),
}


@pytest.mark.parametrize("values", [None, "full.yaml"], ids=["defaults", "full"])
def test_helm_lint_strict_passes(helm: str, values: str | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["--values", str(VALUES / values)]
    out = run_helm(helm, *args)
    assert "0 chart(s) failed" in out


def _validate(tool: str, objects: list[dict[str, Any]], version: str, tmp_path: Path) -> None:
    path = tmp_path / f"rendered-{version}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    proc = subprocess.run(
        [tool, "--kubernetes-version", version, "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_rendered_objects_are_valid_for_kubernetes_version(
    render: Any, kubernetes_validate: str, value_set: str, version: str, tmp_path: Path
) -> None:
    values, apis = VALUE_SETS[value_set]
    objects = render("--kube-version", f"{version}.0", values=values, api_versions=apis)
    core = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert len(core) >= 12, f"{value_set}: only {len(core)} objects rendered"
    _validate(kubernetes_validate, core, version, tmp_path)


def test_kubernetes_validate_rejects_an_unknown_field(
    render: Any, kubernetes_validate: str, tmp_path: Path
) -> None:
    """The check above can fail: a misspelt field in the DaemonSet is caught."""
    objects = render()
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    with pytest.raises(AssertionError, match="nodeSelecter"):
        _validate(kubernetes_validate, [daemonset], "1.33", tmp_path)
