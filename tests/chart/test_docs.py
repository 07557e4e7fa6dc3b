"""The chart's documentation and dashboard match what the chart and the code provide.

- The Grafana dashboard queries only metric names the Python code exports.
- Every value in values.yaml has a helm-docs ``# --`` comment and a row in
  chart/README.md's values table.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from .conftest import CHART

pytestmark = pytest.mark.chart

# The metrics aisetl exports (observability/): name -> kind.
EXPORTED = {
    "aisetl_http_requests_total": "counter",
    "aisetl_http_request_duration_seconds": "histogram",
    "aisetl_object_requests_total": "counter",
    "aisetl_object_bytes_total": "counter",
    "aisetl_etl_requests_total": "counter",
    "aisetl_etl_errors_total": "counter",
    "aisetl_etl_request_duration_seconds": "histogram",
    "aisetl_etl_bytes_in_total": "counter",
    "aisetl_etl_bytes_out_total": "counter",
    "aisetl_etl_transformer_restarts_total": "counter",
    "aisetl_etl_transformers_ready": "gauge",
    "aisetl_xaction_objects_total": "counter",
    "aisetl_xaction_bytes_total": "counter",
    "aisetl_xaction_errors_total": "counter",
    "aisetl_xaction_duration_seconds": "histogram",
    "aisetl_xactions_running": "gauge",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _dashboard() -> dict[str, Any]:
    return json.loads((CHART / "files" / "dashboards" / "aisetl.json").read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def _metric_names(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"\baisetl_[a-z0-9_]+", expr):
        base = token
        for suffix in HISTOGRAM_SERIES:
            if token.endswith(suffix) and token[: -len(suffix)] in EXPORTED:
                base = token[: -len(suffix)]
                assert EXPORTED[base] == "histogram", f"{token}: {base} is not a histogram"
        names.add(base)
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    exprs = _exprs(_dashboard())
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"query uses no aisetl metric: {expr}"
        assert names <= EXPORTED.keys(), f"unknown metrics {names - EXPORTED.keys()} in {expr}"
        used |= names
    # Histograms are read through their buckets, counters through rate/increase.
    for expr in exprs:
        if expr.startswith("label_values("):
            continue
        for name in re.findall(r"\baisetl_[a-z0-9_]+_total\b", expr):
            assert re.search(rf"(rate|increase)\({name}\{{", expr), f"raw counter in {expr}"
    # Everything the issue asks the dashboard to show is queried.
    assert used == EXPORTED.keys(), f"metrics not on the dashboard: {EXPORTED.keys() - used}"


def test_dashboard_has_the_panels_operators_look_for() -> None:
    dashboard = _dashboard()
    titles = {p["title"] for p in dashboard["panels"]}
    for title in (
        "ETL request rate",
        "ETL latency p50 / p90 / p99",
        "ETL errors",
        "ETL bytes in / out",
        "Transformers ready",
        "Transformer restarts",
        "Running jobs",
        "Job objects / s",
        "Job bytes / s",
        "Object GET / PUT rate",
    ):
        assert title in titles
    per_etl = [
        t["expr"]
        for p in dashboard["panels"]
        if p["type"] != "row" and p["title"].startswith("ETL ")
        for t in p["targets"]
    ]
    assert all("by (etl, comm_type)" in e or "by (le, etl, comm_type)" in e for e in per_etl)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_rule_queries_only_exported_metrics() -> None:
    source = (CHART / "templates" / "prometheusrule.yaml").read_text()
    for expr in re.findall(r"expr: (.+(?:\n {14}.+)*)", source):
        assert _metric_names(expr) <= EXPORTED.keys(), expr


def _documented_values() -> tuple[dict[str, str], list[str]]:
    """Key paths of values.yaml with their "# --" comment, and the paths of all leaves."""
    documented: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    comment: str | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = stripped[4:].strip()
            continue
        match = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if comment is not None:
            documented[path] = comment
            comment = None

    leaves: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if prefix in documented:
            leaves.append(prefix)
            return
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            leaves.append(prefix)

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), "")
    return documented, leaves


def test_every_value_has_a_helm_docs_comment() -> None:
    documented, leaves = _documented_values()
    assert len(leaves) >= 60
    undocumented = [leaf for leaf in leaves if leaf not in documented]
    assert not undocumented, f"values without a '# --' comment: {undocumented}"


def test_readme_table_lists_every_value_with_its_default() -> None:
    documented, leaves = _documented_values()
    readme = (CHART / "README.md").read_text()
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| `([A-Za-z0-9_.]+)` \|.*$", readme, flags=re.MULTILINE)
    }
    missing = [leaf for leaf in leaves if leaf not in rows]
    assert not missing, f"chart/README.md has no row for: {missing}"
    extra = [key for key in rows if key not in documented]
    assert not extra, f"chart/README.md lists values that do not exist: {extra}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for leaf in leaves:
        default: Any = values
        for key in leaf.split("."):
            default = default[key]
        cells = [c.strip() for c in rows[leaf].strip("|").split("|")]
        assert len(cells) == 4, f"row of {leaf} needs value | type | default | description"
        assert cells[2] == f"`{json.dumps(default)}`", f"{leaf}: README default {cells[2]}"
