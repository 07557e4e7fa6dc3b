"""Prerequisites of a test: skip on a developer's machine, fail in CI.

A test that needs something outside the repo (podman, a locally built image,
kube-apiserver binaries, helm) calls ``require(ok, what, fix)``. Where ``CI`` is
``true`` a missing prerequisite fails the test, so a CI run can never go green
by skipping what it was meant to test; elsewhere the test is skipped with the
command that fixes it.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(ok: bool, what: str, fix: str) -> None:
    """Fail (CI=true) or skip (otherwise) unless ``ok``; ``what`` is missing, ``fix`` fixes it."""
    if ok:
        return
    message = f"missing prerequisite: {what} (fix: {fix})"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
