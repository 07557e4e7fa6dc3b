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


@pytest.fixture
async def no_leaked_tasks() -> object:
    """Fail an async test that leaves asyncio tasks running behind it."""
    import asyncio

    before = asyncio.all_tasks()
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before
              if t is not asyncio.current_task() and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked asyncio tasks: {leaked}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import inspect

    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "obj", None)) and \
                isinstance(item, pytest.Function):
            item.fixturenames.insert(0, "no_leaked_tasks")  # set up first, torn down last
