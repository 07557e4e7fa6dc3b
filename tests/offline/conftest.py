"""One 3-target cluster for the offline-job tests that do not restart targets."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.offline.helpers import MD5_CODE, build, put_many
from tests.support.cluster import LocalCluster

SEED_ETL = "JGHEoo89gg"  # the seed's ETL ID: the md5 transform of code.py
N_OBJECTS = 1200


def payload(i: int) -> bytes:
    return f"object {i} ".encode() * (1 + i % 37)


@pytest.fixture(scope="module")
def oc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("offline"), targets=3,
                     env={"AISETL_LOG_LEVEL": "info"})
    with c:
        build(c, MD5_CODE, SEED_ETL)
        yield c


@pytest.fixture(scope="module")
def many(oc: LocalCluster) -> dict[str, bytes]:
    """1,200 objects in bucket 'many', spread over the 3 targets by HRW."""
    objects = {f"dir{i % 7}/obj-{i:05d}.in": payload(i) for i in range(N_OBJECTS)}
    put_many(oc, "many", objects)
    return objects


@pytest.fixture
def oc_env(oc: LocalCluster) -> dict[str, str]:
    return {**os.environ, "AIS_ENDPOINT": oc.endpoint}
