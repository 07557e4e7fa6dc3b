"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 3-target local cluster shared by the tests that do not break it."""
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), targets=3)
    with c:
        yield c


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own, for tests that kill or restart processes."""
    c = LocalCluster(tmp_path / "state", targets=3)
    with c:
        yield c


@pytest.fixture
def ais_env(cluster: LocalCluster) -> dict[str, str]:
    return {**os.environ, "AIS_ENDPOINT": cluster.endpoint}
