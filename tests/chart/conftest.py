"""Fixtures of the chart tests: locate helm and kubernetes-validate, render the chart.

Both tools live outside the repo (``hack/install-tools.sh`` puts helm into
``${AISETL_CACHE:-~/.cache/aisetl}/bin``). A missing tool skips these tests on
a developer's machine and fails them in CI (``support.prereq.require``).
Nothing here talks to a cluster: ``helm template`` renders client-side, with
``--api-versions`` standing in for the APIs a cluster would serve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prereq import require

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
VALUES = Path(__file__).resolve().parent / "values"
RELEASE = "smoke"
NAMESPACE = "aisetl-test"
FULLNAME = f"{RELEASE}-aisetl"
MONITORING_API = "monitoring.coreos.com/v1"
FIX = "hack/install-tools.sh"


def _find_helm() -> str | None:
    cache = Path(os.environ.get("AISETL_CACHE", Path.home() / ".cache" / "aisetl"))
    cached = cache / "bin" / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = _find_helm()
    require(path is not None, "helm (PATH or ${AISETL_CACHE:-~/.cache/aisetl}/bin/helm)", FIX)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    path = shutil.which("kubernetes-validate")
    require(
        path is not None, "kubernetes-validate (PyPI)", f"{FIX} or pip install kubernetes-validate"
    )
    assert path is not None
    return path


class HelmFailed(Exception):
    """helm exited non-zero; the message is its stderr."""


def run_helm(helm: str, *args: str) -> str:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise HelmFailed(proc.stderr.strip() or proc.stdout.strip())
    return proc.stdout


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render_text(helm: str) -> Callable[..., str]:
    """``helm template`` of the chart; keyword ``values`` names files under tests/chart/values."""
    cache: dict[tuple[Any, ...], str] = {}

    def _render(
        *extra: str,
        values: tuple[str, ...] = (),
        api_versions: tuple[str, ...] = (),
    ) -> str:
        key = (extra, values, api_versions)
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
            for name in values:
                args += ["--values", str(VALUES / name)]
            for api in api_versions:
                args += ["--api-versions", api]
            cache[key] = run_helm(helm, *args, *extra)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def render(render_text: Callable[..., str]) -> Render:
    """Like render_text, parsed into the list of rendered objects."""

    def _render(*extra: str, **kwargs: Any) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(render_text(*extra, **kwargs)) if d]

    return _render


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]
