"""The reconciler survives a broken orchestrator call.

The orchestrator here is a stub at our own adapter boundary (orchestrator/base.py):
the point is what the manager does when the layer below it fails with an
unexpected exception, which a real process or container cannot be made to do
on demand.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aisetl.control.local import LocalControlStore
from aisetl.etl.manager import EtlManager
from aisetl.model.etl import EtlDeclaration, parse_build, to_document
from aisetl.observability.metrics import Metrics
from aisetl.orchestrator.base import Orchestrator, Transformer, TransformerContext
from aisetl.settings import EtlSettings

CODE = "def transform(b):\n    return b\n"


class StubTransformer(Transformer):
    def __init__(self, etl_id: str) -> None:
        self.etl_id = etl_id
        self.endpoint = self.public_endpoint = "http://127.0.0.1:9"
        self.stopped = asyncio.Event()

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def wait_exit(self) -> str:
        await self.stopped.wait()
        return "stopped"

    async def logs(self, tail: int = 50) -> str:
        return ""

    async def stop(self) -> None:
        self.stopped.set()


class Orch(Orchestrator):
    def __init__(self) -> None:
        self.started: list[str] = []

    async def start(self, decl: EtlDeclaration, ctx: TransformerContext) -> Transformer:
        if decl.id.startswith("broken"):
            raise ValueError("invalid environment variable name 'A=B'")
        self.started.append(decl.id)
        return StubTransformer(decl.id)


async def _state(store: LocalControlStore, etl_id: str) -> str:
    for _ in range(200):
        st = (await store.etl_statuses(etl_id)).get("t1")
        if st and st["state"] != "Initializing":
            return f"{st['state']}: {st['reason']}"
        await asyncio.sleep(0.01)
    return "never reported"


async def test_an_unexpected_orchestrator_error_fails_one_etl_not_the_target(
        tmp_path: Path) -> None:
    store = LocalControlStore(tmp_path)
    ctx = TransformerContext("t1", "http://127.0.0.1:1", "s", tmp_path / "w", tmp_path / "c")
    manager = EtlManager(store, Orch(), ctx, Metrics.create(), EtlSettings())

    def doc(etl_id: str) -> dict[str, object]:
        return to_document(parse_build({"code": CODE, "runtime": "python3", "id": etl_id}))

    await store.create_etl(doc("broken1"))
    await store.create_etl(doc("good1"))
    await manager.reconcile()
    assert await _state(store, "broken1") == \
        "Failed: ValueError: invalid environment variable name 'A=B'"
    assert (await _state(store, "good1")).startswith("Ready")

    await store.delete_etl("broken1")  # the gateway cleans up after the failure
    await store.create_etl(doc("good2"))
    await manager.reconcile()
    assert "broken1" not in manager.slots
    assert (await _state(store, "good2")).startswith("Ready")
    await manager.close()
    assert manager.slots == {}
