"""A local cluster for ETL tests.

Dependencies of build ETLs are installed by the targets with pip. Tests send
no traffic beyond loopback, so pip is pointed at a local wheelhouse that
hack/test.sh fills before the tests run (PIP_NO_INDEX + PIP_FIND_LINKS).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import LocalCluster

WHEELHOUSE = Path(os.environ.get("AISETL_CACHE", Path.home() / ".cache" / "aisetl")) / \
    "wheelhouse"


def cluster_env() -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE),
            "AISETL_LOG_LEVEL": "info"}


@pytest.fixture(scope="module")
def etl_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("etl"), targets=3, env=cluster_env())
    with c:
        yield c


@pytest.fixture
def env(etl_cluster: LocalCluster) -> dict[str, str]:
    return {**os.environ, "AIS_ENDPOINT": etl_cluster.endpoint}
