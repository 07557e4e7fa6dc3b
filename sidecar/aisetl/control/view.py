"""A cached, watched view of the cluster: live targets and buckets.

Gateways and targets answer every request from this view instead of reading
the control store each time. The view re-reads a kind whenever the store's
watch says it changed; a bucket missing from the cache is read once more from
the store before a request is refused (a bucket created a moment ago through
another gateway may not have reached the watch yet).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from aisetl.aio import cancel_and_wait
from aisetl.control.base import BUCKETS, TARGETS, ControlStore
from aisetl.model import placement
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import BucketNotFound, Unavailable

log = structlog.get_logger("view")


class ClusterView:
    def __init__(self, store: ControlStore) -> None:
        self.store = store
        self.targets: list[TargetInfo] = []
        self.by_id: dict[str, TargetInfo] = {}
        self.buckets: dict[str, BucketInfo] = {}
        self.ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[str], Awaitable[None]]] = []

    def on_change(self, fn: Callable[[str], Awaitable[None]]) -> None:
        """Call ``fn(kind)`` after the view re-read a kind (for other watchers)."""
        self._listeners.append(fn)

    async def refresh(self, kind: str) -> None:
        if kind == TARGETS:
            self.targets = await self.store.live_targets()
            self.by_id = {t.id: t for t in self.targets}
        elif kind == BUCKETS:
            self.buckets = {b.name: b for b in await self.store.list_buckets()}

    async def run(self) -> None:
        """Follow the store's watch until cancelled, restarting it if it breaks."""
        while True:
            try:
                async for kind in self.store.watch():
                    await self.refresh(kind)
                    if kind in (TARGETS, BUCKETS):
                        self.ready.set()
                    async with self._changed:
                        self._changed.notify_all()
                    for fn in self._listeners:
                        try:
                            await fn(kind)
                        except Exception:
                            log.exception("view listener failed", kind=kind)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control store watch broke; watching again")
                await asyncio.sleep(1.0)

    async def start(self) -> asyncio.Task[None]:
        await self.refresh(TARGETS)
        await self.refresh(BUCKETS)
        return asyncio.create_task(self.run(), name="cluster-view")

    @staticmethod
    async def stop(task: asyncio.Task[None]) -> None:
        await cancel_and_wait(task)

    async def wait_change(self, timeout: float) -> None:
        """Sleep until the store reports any change, or ``timeout`` passes."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
        # cancellation that arrives together with the wake-up
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait()

    # --- queries -----------------------------------------------------------------------
    def owner(self, bucket: str, obj: str) -> TargetInfo:
        if not self.targets:
            raise Unavailable("no storage targets have joined the cluster yet: start targets "
                              "(aisetl up) and retry")
        tid = placement.owner(placement.object_key(bucket, obj), self.by_id)
        return self.by_id[tid]

    async def bucket(self, name: str) -> BucketInfo:
        b = self.buckets.get(name)
        if b is None:
            b = await self.store.get_bucket(name)
            if b is not None:
                self.buckets[name] = b
        if b is None:
            raise BucketNotFound(f"bucket {name!r} does not exist: create it with "
                                 f"'ais create bucket {name}'", bucket=name)
        return b
