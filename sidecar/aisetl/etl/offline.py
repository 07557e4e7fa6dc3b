"""One target's share of an offline (bucket-to-bucket) ETL job.

A target walks its own objects of the source bucket (a listing in a thread),
and ``concurrency`` workers take names from that list one by one: each
object is streamed through the ETL's transformer (``open_transform``) and the
reply is streamed on, unbuffered, to the owner target of the new name — a
target-to-target ``PUT /v1/objects/<dst>/<new name>``, or ``ObjectStore.put``
when the owner is this target. A dry run reads the reply and only counts it.

Placement uses HRW over the job's target list, fixed when the job started,
not over the live map: if a target drops out for a while (a restart), a
result it owns is not written to a stand-in where no one would find it once
it is back; the PUT is retried until it returns (or ``retry_for`` passes).

Errors, per object:

- transient (``retryable``: the transformer restarting, a peer restarting, a
  connection cut mid-stream) are retried with exponential backoff for up to
  ``retry_for`` seconds; the object is then transformed again from the start,
  so a restart loses nothing and a result is only ever installed whole;
- anything else (the user's transform raised, a name that cannot be stored)
  is counted and listed (``MAX_ERRORS_LISTED``) and the job goes on — unless
  the job says ``stop_on_error``, then it aborts at that first error.

The job aborts when asked (``abort``) and when its ETL is no longer declared
(stopped). Cancelled writes leave nothing: a local ``put`` removes its
temporary file, and a peer sees an incomplete chunked upload and discards it.
Progress is kept in memory (``progress``) and saved in the control store
every ``report_every`` seconds and at the end, so the gateway can still show
it — and this target can resume its share — after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import structlog

from aisetl.aio import cancel_and_wait
from aisetl.control.base import ETLS, XACTIONS, ControlStore
from aisetl.control.view import ClusterView
from aisetl.etl.communicators import open_transform
from aisetl.etl.manager import EtlManager
from aisetl.model import placement
from aisetl.model.errors import (
    AisError,
    EtlNotFound,
    InvalidName,
    InvalidRequest,
    ObjectNotFound,
    Unavailable,
    UpstreamError,
    XactionNotFound,
)
from aisetl.model.names import validate_object
from aisetl.model.xaction import (
    KIND,
    RECORD_REPORT,
    Job,
    Progress,
    is_job_record,
    report_key,
)
from aisetl.observability.metrics import Metrics
from aisetl.settings import CHUNK_SIZE
from aisetl.storage.objects import ObjectStore

log = structlog.get_logger("etl.offline")


class OfflineJob:
    def __init__(self, job: Job, *, me: str, store: ObjectStore, manager: EtlManager,
                 control: ControlStore, view: ClusterView,
                 transform_session: aiohttp.ClientSession, peer_session: aiohttp.ClientSession,
                 metrics: Metrics, concurrency: int = 8, attempt: int = 1,
                 retry_for: float = 120.0, backoff: tuple[float, float] = (0.05, 2.0),
                 report_every: float = 1.0, ready_wait: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.job = job
        self.me = me
        self.store = store
        self.manager = manager
        self.control = control
        self.view = view
        self.tsession = transform_session
        self.psession = peer_session
        self.metrics = metrics
        self.concurrency = max(1, concurrency)
        self.retry_for = retry_for
        self.backoff = backoff
        self.report_every = report_every
        self.ready_wait = ready_wait
        self.clock = clock
        self.progress = Progress(target=me, attempt=attempt)
        self.done = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._abort_reason = ""

    # --- control ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.progress.finished

    def abort(self, reason: str) -> None:
        """Stop taking objects, cancel the ones in flight (nothing half-written stays)."""
        if self._abort_reason or self.progress.finished:
            return
        self._abort_reason = reason or "aborted"
        log.info("aborting offline job", xaction=self.job.id, reason=self._abort_reason)
        for w in self._workers:
            w.cancel()

    async def run(self) -> None:
        """The whole share; cancelling this task (target shutdown) saves no final state."""
        job, p = self.job, self.progress
        structlog.contextvars.bind_contextvars(xaction=job.id, etl=job.etl)
        m = self.metrics
        m.xactions_running.labels(KIND).inc()
        start = time.monotonic()
        p.started = self.clock()
        reporter = asyncio.create_task(self._report_loop(), name=f"xact-report-{job.id}")
        try:
            try:
                names = await asyncio.to_thread(self.store.iter_names, job.src)
            except (FileNotFoundError, NotADirectoryError):
                names = []
            p.total = len(names)
            await self._save()  # from now on a restart of this target resumes the share
            log.info("offline job started", xaction=job.id, objects=len(names),
                     dry_run=job.dry_run, attempt=p.attempt)
            it = iter(names)
            self._workers = [asyncio.create_task(self._worker(it), name=f"xact-{job.id}-{i}")
                             for i in range(min(self.concurrency, max(1, len(names))))]
            if self._abort_reason:  # aborted while listing
                for w in self._workers:
                    w.cancel()
            await asyncio.wait(self._workers)
            for w in self._workers:
                if not w.cancelled() and w.exception() is not None:
                    exc = w.exception()
                    log.error("offline worker crashed", error=repr(exc))
                    self._abort_reason = self._abort_reason or f"internal error: {exc!r}"
            p.aborted = bool(self._abort_reason)
            p.reason = self._abort_reason
            p.ended = self.clock()
            p.finished = True
            m.xaction_duration.labels(KIND).observe(time.monotonic() - start)
            log.info("offline job ended", xaction=job.id, objects=p.objects, bytes=p.bytes,
                     errors=p.errors, aborted=p.aborted, reason=p.reason,
                     seconds=round(time.monotonic() - start, 3))
        finally:
            for w in self._workers:
                w.cancel()
            if self._workers:
                await asyncio.wait(self._workers)
            await cancel_and_wait(reporter)
            m.xactions_running.labels(KIND).dec()
            if p.finished:
                await asyncio.shield(self._save())
                self.done.set()

    # --- reporting ----------------------------------------------------------------------------
    async def _save(self) -> None:
        try:
            await self.control.put_xaction(report_key(self.job.id, self.me),
                                           {**self.progress.to_dict(), "xaction": self.job.id})
        except Exception:
            log.exception("could not save job progress", xaction=self.job.id)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_every)
            await self._save()

    # --- one object -----------------------------------------------------------------------------
    async def _worker(self, names: Iterator[str]) -> None:
        for name in names:  # a shared iterator: each name goes to exactly one worker
            await self._one(name)

    def _error(self, obj: str, reason: str) -> None:
        self.progress.add_error(obj, reason)
        self.metrics.xaction_errors.labels(KIND).inc()
        if self.job.stop_on_error:
            self.abort(f"stopped at the first error (stop_on_error): {obj}: {reason}")

    async def _one(self, name: str) -> None:
        job = self.job
        new = job.naming.new_name(name)
        try:
            validate_object(new, job.dst)
        except InvalidName as e:
            self._error(name, f"new name {new!r}: {e.message}")
            return
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff[0]
        while True:
            try:
                n = await self._transform(name, new)
            except ObjectNotFound as e:
                if e.context.get("bucket") == job.src:
                    self._error(name, "deleted from the source bucket during the job")
                else:
                    self._error(name, e.message)
                return
            except EtlNotFound as e:
                if not await self._declared():
                    self.abort(f"ETL {job.etl} was stopped")
                    return
                err: AisError = Unavailable(e.message)  # declared, not reconciled here yet
            except AisError as e:
                err = e
            else:
                self.progress.objects += 1
                self.progress.bytes += n
                self.metrics.xaction_objects.labels(KIND).inc()
                self.metrics.xaction_bytes.labels(KIND).inc(n)
                return
            if not err.retryable or time.monotonic() + delay > deadline:
                why = err.message if not err.retryable else \
                    f"gave up after {self.retry_for:.0f}s of retries: {err.message}"
                self._error(name, why)
                return
            log.info("transient error; retrying", object=name, error=err.message, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _declared(self) -> bool:
        try:
            docs = await self.control.list_etls()
        except Exception:
            return True  # cannot tell: do not abort on a control-store hiccup
        return any((d.get("data") or {}).get("id") == self.job.etl for d in docs)

    async def _transform(self, name: str, new: str) -> int:
        """Transform ``name`` and store (or count) the result as ``new``; its size."""
        job = self.job
        slot, t = await self.manager.ready(job.etl, wait=self.ready_wait)
        try:
            async with open_transform(self.tsession, t, slot.decl.comm_type, job.etl,
                                      self.store, job.src, name) as r:
                if job.dry_run:
                    n = 0
                    async for chunk in r.content.iter_chunked(CHUNK_SIZE):
                        n += len(chunk)
                    return n
                if r.content_length is not None and r.content_length <= SMALL_RESULT:
                    # small results (digests, thumbnails): one buffer, sent with a
                    # Content-Length instead of a chunked stream (less CPU per object)
                    data = await r.read()
                    return await self._store(new, data)
                return await self._store(new, _chunks(r, job.etl, job.src, name))
        except aiohttp.ClientError as e:  # the reply broke off mid-stream
            raise UpstreamError(f"ETL {job.etl}: transformer reply for {job.src}/{name} broke "
                                f"off: {e or type(e).__name__}", etl=job.etl,
                                object=name) from e

    async def _store(self, new: str, body: AsyncIterator[bytes] | bytes) -> int:
        job = self.job
        owner = placement.owner(placement.object_key(job.dst, new), job.targets)
        if owner == self.me:
            meta = await self.store.put(job.dst, new,
                                        _one(body) if isinstance(body, bytes) else body)
            return meta.size
        peer = self.view.by_id.get(owner)
        if peer is None:
            raise Unavailable(f"target {owner}, owner of {job.dst}/{new}, is not in the cluster "
                              "map (restarting?): retrying", target=owner)
        url = (f"{peer.url}/v1/objects/{urllib.parse.quote(job.dst, safe='')}/"
               f"{urllib.parse.quote(new, safe='/')}")
        try:
            async with self.psession.put(url, data=body, headers={
                    "Content-Type": "application/octet-stream"}) as resp:
                text = await resp.read()
                if resp.status != 200:
                    msg = text.decode(errors="replace")[:300]
                    err = AisError(f"target {owner} refused {job.dst}/{new}: HTTP "
                                   f"{resp.status}: {msg}", target=owner)
                    if resp.status >= 500:
                        err = UpstreamError(err.message, target=owner)
                    raise err
                return int(resp.headers.get("X-Ais-Size", "0"))
        except aiohttp.ClientError as e:
            if isinstance(e.__cause__, AisError):  # the transformer's reply broke off
                raise e.__cause__ from e
            raise UpstreamError(f"PUT {job.dst}/{new} to target {owner} failed: "
                                f"{e or type(e).__name__}", target=owner) from e


SMALL_RESULT = 1 << 20
"""Results up to this size are buffered once and PUT with a Content-Length."""


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _chunks(r: aiohttp.ClientResponse, etl: str, bucket: str, obj: str
                  ) -> AsyncIterator[bytes]:
    try:
        async for chunk in r.content.iter_chunked(CHUNK_SIZE):
            yield chunk
    except aiohttp.ClientError as e:
        raise UpstreamError(f"ETL {etl}: transformer reply for {bucket}/{obj} broke off: "
                            f"{e or type(e).__name__}", etl=etl, object=obj) from e


class OfflineJobs:
    """Every offline job of this target, reconciled against the control store.

    The gateway POSTs a new job here (the fast path). A level-based pass —
    at start-up and whenever job records or ETL declarations change — also
    starts any job of the store that lists this target, is not aborted and
    has no finished report from this target (a job this target was running
    when it restarted, or one whose POST it missed: its share starts again,
    ``attempt`` + 1), and aborts running jobs that were aborted in the store
    or whose ETL is no longer declared.
    """

    def __init__(self, me: str, control: ControlStore, new_job: Callable[[Job, int], OfflineJob],
                 min_interval: float = 0.5) -> None:
        self.me = me
        self.control = control
        self.new_job = new_job
        self.min_interval = min_interval
        self.jobs: dict[str, OfflineJob] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._settled: set[str] = set()  # jobs this target need not look at again
        self._poke = asyncio.Event()

    def start(self, job: Job, attempt: int = 1) -> OfflineJob:
        """Run ``job`` here unless it already runs (or ran) in this process."""
        have = self.jobs.get(job.id)
        if have is not None:
            return have
        if self.me not in job.targets:
            raise InvalidRequest(f"xaction {job.id} does not run on target {self.me} (it runs "
                                 f"on {', '.join(job.targets)})", xaction=job.id)
        oj = self.new_job(job, attempt)
        self.jobs[job.id] = oj
        self.tasks[job.id] = asyncio.create_task(oj.run(), name=f"xact-{job.id}")
        return oj

    def get(self, xid: str) -> OfflineJob:
        oj = self.jobs.get(xid)
        if oj is None:
            raise XactionNotFound(f"xaction {xid!r} is not known on target {self.me}",
                                  xaction=xid, target=self.me)
        return oj

    async def abort(self, xid: str, reason: str, wait: float = 30.0) -> OfflineJob:
        """Abort a job and wait (bounded) until nothing of it runs any more."""
        oj = self.get(xid)
        oj.abort(reason)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(oj.done.wait(), wait)
        return oj

    # --- reconcile ----------------------------------------------------------------------------
    def poke(self) -> None:
        self._poke.set()

    async def on_change(self, kind: str) -> None:
        """A ClusterView listener: cheap, the pass runs in ``loop``."""
        if kind in (XACTIONS, ETLS):
            self._poke.set()

    async def loop(self) -> None:
        """Reconcile whenever poked, at most every ``min_interval`` seconds."""
        while True:
            await self._poke.wait()
            self._poke.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("offline jobs: reconcile failed")
            await asyncio.sleep(self.min_interval)

    async def reconcile(self) -> None:
        records = await self.control.list_xactions()
        reports = {(str(r.get("xaction", "")), str(r.get("target", ""))): r
                   for r in records if r.get("type") == RECORD_REPORT}
        declared = {str((d.get("data") or {}).get("id", "")) for d in
                    await self.control.list_etls()}
        for r in records:
            if not is_job_record(r):
                continue
            job = Job.from_record(r)
            running = self.jobs.get(job.id)
            if running is not None:
                if not running.finished:
                    if job.aborted:
                        running.abort(job.abort_reason or "aborted")
                    elif job.etl not in declared:
                        running.abort(f"ETL {job.etl} was stopped")
                continue
            if job.id in self._settled or self.me not in job.targets or job.aborted:
                continue
            report = reports.get((job.id, self.me))
            if report is not None and report.get("finished"):
                self._settled.add(job.id)
                continue
            if job.etl not in declared:
                continue
            attempt = int(report.get("attempt", 1)) + 1 if report is not None else 1
            log.info("resuming offline job", xaction=job.id, attempt=attempt)
            self.start(job, attempt)

    async def close(self) -> None:
        """Target shutdown: stop every job without recording an end (they resume)."""
        for t in self.tasks.values():
            t.cancel()
        for t in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


__all__ = ["OfflineJob", "OfflineJobs"]
