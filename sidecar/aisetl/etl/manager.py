"""Reconcile ETL declarations into transformers on one target.

Level-based, as in controller-runtime: a change in the control store only says
"look again"; each pass re-reads every declaration, computes
``model.reconcile.plan(desired, actual)`` and applies it. Each running ETL has
a supervisor task that starts its transformer, waits for readiness within
``wait_timeout``, reports status (Initializing / Ready / Failed + reason,
restarts) to the control store, and restarts a transformer that crashes after
it was Ready, with exponential backoff. A transformer that never became ready
is not retried: the ETL is Failed on this target, and the gateway removes the
declaration, which stops everything the ETL started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from aisetl.aio import cancel_and_wait
from aisetl.control.base import ETLS, ControlStore
from aisetl.model.errors import AisError, EtlNotFound, InvalidSpec, Unavailable
from aisetl.model.etl import EtlDeclaration, from_document
from aisetl.model.reconcile import FAILED, INITIALIZING, READY, EtlStatus, fingerprint, plan
from aisetl.observability.metrics import Metrics
from aisetl.orchestrator.base import Orchestrator, Transformer, TransformerContext
from aisetl.settings import EtlSettings

log = structlog.get_logger("etl")


async def _stop_quietly(t: Transformer, etl_id: str) -> None:
    try:
        await t.stop()
    except Exception:
        log.exception("could not stop transformer", etl=etl_id)


@dataclass
class Slot:
    """One declared ETL on this target."""

    decl: EtlDeclaration
    fingerprint: str
    status: EtlStatus = field(default_factory=EtlStatus)
    transformer: Transformer | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0  # bumps at every (re)start: lets callers detect restarts


class EtlManager:
    def __init__(self, control: ControlStore, orchestrator: Orchestrator,
                 ctx: TransformerContext, metrics: Metrics, settings: EtlSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.control = control
        self.orchestrator = orchestrator
        self.ctx = ctx
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.slots: dict[str, Slot] = {}
        self._lock = asyncio.Lock()

    # --- reconcile ------------------------------------------------------------------------
    async def on_change(self, kind: str) -> None:
        if kind == ETLS:
            await self.reconcile()

    async def reconcile(self) -> None:
        async with self._lock:
            desired: dict[str, str] = {}
            decls: dict[str, EtlDeclaration] = {}
            for doc in await self.control.list_etls():
                etl_id = str((doc.get("data") or {}).get("id", ""))
                try:
                    decl = from_document(doc)
                except InvalidSpec as e:
                    log.warning("invalid ETL declaration", etl=etl_id, error=e.message)
                    if etl_id:
                        await self._report(etl_id, EtlStatus(
                            FAILED, f"invalid declaration: {e.message}", updated=self.clock()))
                    continue
                desired[decl.id] = fingerprint(doc)
                decls[decl.id] = decl
            actual = {i: s.fingerprint for i, s in self.slots.items()}
            for action in plan(desired, actual):
                if action.kind == "stop":
                    await self._stop(action.etl_id)
                else:
                    self._start(decls[action.etl_id], desired[action.etl_id])

    def _start(self, decl: EtlDeclaration, fp: str) -> None:
        slot = Slot(decl, fp, EtlStatus(INITIALIZING, fingerprint=fp, updated=self.clock()))
        self.slots[decl.id] = slot
        slot.task = asyncio.create_task(self._supervise(slot), name=f"etl-{decl.id}")
        log.info("starting transformer", etl=decl.id, kind=decl.kind,
                 comm_type=decl.comm_type)

    async def _stop(self, etl_id: str) -> None:
        slot = self.slots.get(etl_id)
        if slot is None:
            return
        log.info("stopping transformer", etl=etl_id)
        slot.ready.clear()  # no new requests; the slot stays listed until all is gone
        if slot.task is not None:
            await cancel_and_wait(slot.task)
        if slot.transformer is not None:
            await _stop_quietly(slot.transformer, etl_id)
        self.metrics.etl_ready.labels(etl_id).set(0)
        if self.slots.get(etl_id) is slot:
            del self.slots[etl_id]

    async def close(self) -> None:
        async with self._lock:
            for etl_id in list(self.slots):
                await self._stop(etl_id)

    # --- one ETL -------------------------------------------------------------------------
    async def _report(self, etl_id: str, status: EtlStatus) -> None:
        slot = self.slots.get(etl_id)
        if slot is not None:
            slot.status = status
        try:
            await self.control.put_etl_status(etl_id, self.ctx.target_id, status.to_dict())
        except Exception:
            log.exception("could not record ETL status", etl=etl_id)

    async def _supervise(self, slot: Slot) -> None:
        decl = slot.decl
        backoff = self.settings.restart_backoff
        restarts = 0
        was_ready = False
        while True:
            slot.generation += 1
            t: Transformer | None = None
            try:
                t = await self.orchestrator.start(decl, self.ctx)
                slot.transformer = t
                await t.wait_ready(decl.wait_timeout_seconds)
            except Exception as e:  # AisError, or a bug below us: report it, never die silently
                reason = e.message if isinstance(e, AisError) else f"{type(e).__name__}: {e}"
                log.warning("transformer failed to start", etl=decl.id, reason=reason,
                            exc_info=not isinstance(e, AisError))
                if t is not None:
                    await _stop_quietly(t, decl.id)
                slot.transformer = None
                await self._report(decl.id, EtlStatus(FAILED, reason, restarts,
                                                       fingerprint=slot.fingerprint,
                                                       updated=self.clock(),
                                                       error=type(e).__name__))
                if not was_ready:
                    return  # init failed: the gateway cleans up
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_restart_backoff)
                continue
            was_ready = True
            ready_at = time.monotonic()
            slot.ready.set()
            self.metrics.etl_ready.labels(decl.id).set(1)
            await self._report(decl.id, EtlStatus(READY, "", restarts, t.endpoint,
                                                  slot.fingerprint, self.clock()))
            try:
                why = await t.wait_exit()
                tail = await t.logs(10)
            except Exception as e:  # the orchestrator lost track of it: start afresh
                why, tail = f"lost track of the transformer: {type(e).__name__}: {e}", ""
            slot.ready.clear()
            self.metrics.etl_ready.labels(decl.id).set(0)
            await _stop_quietly(t, decl.id)
            slot.transformer = None
            restarts += 1
            self.metrics.etl_restarts.labels(decl.id).inc()
            if time.monotonic() - ready_at > 60:
                backoff = self.settings.restart_backoff
            log.warning("transformer exited; restarting", etl=decl.id, reason=why,
                        restarts=restarts, backoff=backoff, last_logs=tail)
            await self._report(decl.id, EtlStatus(
                INITIALIZING, f"restarting after the transformer ended ({why})", restarts,
                fingerprint=slot.fingerprint, updated=self.clock()))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.max_restart_backoff)

    # --- lookups for the data path ---------------------------------------------------------
    def get(self, etl_id: str) -> Slot:
        slot = self.slots.get(etl_id)
        if slot is None:
            raise EtlNotFound(f"ETL {etl_id!r} does not exist on this target (ais etl ls "
                              "lists them)", etl=etl_id, target=self.ctx.target_id)
        return slot

    async def ready(self, etl_id: str, wait: float = 0.0) -> tuple[Slot, Transformer]:
        """The Ready transformer of ``etl_id``, waiting up to ``wait`` seconds for it."""
        slot = self.get(etl_id)
        if not slot.ready.is_set() and wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(slot.ready.wait(), wait)
        t = slot.transformer
        if not slot.ready.is_set() or t is None:
            st = slot.status
            raise Unavailable(f"ETL {etl_id!r} is {st.state} on target {self.ctx.target_id}"
                              + (f" ({st.reason})" if st.reason else "") + ": retry shortly",
                              etl=etl_id, target=self.ctx.target_id)
        return slot, t
