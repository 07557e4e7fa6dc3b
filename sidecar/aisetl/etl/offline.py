"""One target's share of an offline (bucket-to-bucket) ETL job.

A target walks its own objects of the source bucket (a listing in a thread),
and ``concurrency`` workers take names from that list. Two paths, with the
same outcome per object:

- **per object** (``_one``): the object is streamed through the ETL's
  transformer (``open_transform``) and the reply is streamed on, unbuffered,
  to the owner target of the new name — a target-to-target ``PUT
  /v1/objects/<dst>/<new name>``, or ``ObjectStore.put`` when the owner is this
  target. Objects above ``BATCH_OBJECT_MAX`` (1 MiB) always go this way, and
  every object does when the transformer does not take batches.
- **batches** (``_batch``), for small objects when the transformer says (in its
  ``/health`` answer) that it serves ``POST /batch`` — our python3 runtime with
  a plain ``transform``; never an init-spec container, never
  ``transform_stream``: a worker takes up to ``BATCH_COUNT`` objects (or
  ``BATCH_BYTES``), sends them in one request read straight from their files,
  and reads one answer per object. Results up to 1 MiB are grouped per owner
  target and sent in one multi-object ``PUT /v1/batch/objects/<dst>``
  (``storage.frames``; ``ObjectStore.batch`` when the owner is this target),
  at most ``BATCH_RESULT_BYTES`` held at a time; a bigger result is streamed on
  to its owner at once, as on the per-object path.

A dry run reads the replies and only counts them.

Placement uses HRW over the job's target list, fixed when the job started,
not over the live map: if a target drops out for a while (a restart), a
result it owns is not written to a stand-in where no one would find it once
it is back; the PUT is retried until it returns (or ``retry_for`` passes).

Errors, per object:

- transient (``retryable``: the transformer restarting, a peer restarting, a
  connection cut mid-stream) are retried with exponential backoff for up to
  ``retry_for`` seconds; the object is then transformed again from the start,
  so a restart loses nothing and a result is only ever installed whole. In a
  batch, the objects answered before a cut are kept (their results stored),
  the rest are sent again; results waiting for a peer are PUT again;
- anything else (the user's transform raised, a name that cannot be stored)
  is counted and listed (``MAX_ERRORS_LISTED``) and the job goes on — unless
  the job says ``stop_on_error``, then it aborts at that first error. A batch
  the transformer refuses as such (or breaks off with a framing error) is done
  per object instead.

The job aborts when asked (``abort``) and when its ETL is no longer declared
(stopped). Cancelled writes leave nothing: a local ``put`` removes its
temporary file, a peer sees an incomplete upload and discards it, results of a
batch not yet sent are dropped, and a peer whose multi-object sender went away
before the commit installs none of it.
Progress is kept in memory (``progress``) and saved in the control store
every ``report_every`` seconds and at the end, so the gateway can still show
it — and this target can resume its share — after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO

import aiohttp
import structlog

from aisetl.aio import cancel_and_wait
from aisetl.control.base import ETLS, XACTIONS, ControlStore
from aisetl.control.view import ClusterView
from aisetl.etl.communicators import (
    BATCH_BROKEN,
    BATCH_FAILED,
    BatchReply,
    BatchUnsupported,
    open_batch,
    open_transform,
    supports_batch,
)
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
from aisetl.orchestrator.base import Transformer
from aisetl.settings import CHUNK_SIZE
from aisetl.storage import frames
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
        self._probed: tuple[Transformer, bool] | None = None  # batch support of a transformer
        self._batch_ok: bool | None = None  # its last answer (None: not asked yet)
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
                names = await asyncio.to_thread(self.store.iter_sizes, job.src)
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
    async def _worker(self, names: Iterator[tuple[str, int]]) -> None:
        # a shared iterator: each name goes to exactly one worker
        for name, size in names:
            if size > BATCH_OBJECT_MAX or self._batch_ok is False:
                await self._one(name)
                continue
            batch, total, big = [name], size, []
            while len(batch) < BATCH_COUNT and total < BATCH_BYTES:
                nxt = next(names, None)
                if nxt is None:
                    break
                if nxt[1] > BATCH_OBJECT_MAX:
                    big.append(nxt[0])
                    continue
                batch.append(nxt[0])
                total += nxt[1]
            await self._batch(batch)
            for n in big:
                await self._one(n)

    def _done(self, n: int) -> None:
        self.progress.objects += 1
        self.progress.bytes += n
        self.metrics.xaction_objects.labels(KIND).inc()
        self.metrics.xaction_bytes.labels(KIND).inc(n)

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
                self._done(n)
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

    # --- batches of small objects ------------------------------------------------------------
    async def _can_batch(self, t: Transformer, kind: str) -> bool:
        """Whether ``t`` takes batches: asked once per transformer (a restart is a new one)."""
        if kind != "build":  # init specs are user containers: per object, always
            self._batch_ok = False
            return False
        if self._probed is None or self._probed[0] is not t:
            self._probed = (t, await supports_batch(self.tsession, t))
            self._batch_ok = self._probed[1]
            log.info("transformer batch support", xaction=self.job.id, batch=self._batch_ok)
        return self._probed[1]

    async def _batch(self, names: list[str]) -> None:
        """Small objects through one batch request, their results to their owners in
        one multi-object PUT each; the same outcome per object as ``_one``."""
        job = self.job
        pending: list[tuple[str, str]] = []
        for name in names:
            new = job.naming.new_name(name)
            try:
                validate_object(new, job.dst)
            except InvalidName as e:
                self._error(name, f"new name {new!r}: {e.message}")
                continue
            pending.append((name, new))
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff[0]
        redo: list[str] = []  # per object after all: the batch path could not take them
        while pending:
            try:
                slot, t = await self.manager.ready(job.etl, wait=self.ready_wait)
                if not await self._can_batch(t, slot.decl.kind):
                    redo += [n for n, _ in pending]
                    break
                await self._batch_once(t, pending, redo)
                continue
            except BatchUnsupported as e:
                log.warning("transformer refused a batch; going on per object",
                            xaction=job.id, error=str(e))
                redo += [n for n, _ in pending]
                break
            except EtlNotFound as e:
                if not await self._declared():
                    self.abort(f"ETL {job.etl} was stopped")
                    return
                err: AisError = Unavailable(e.message)
            except AisError as e:
                err = e
            if not err.retryable:
                redo += [n for n, _ in pending]
                break
            if time.monotonic() + delay > deadline:
                for name, _ in pending:
                    self._error(name, f"gave up after {self.retry_for:.0f}s of retries: "
                                f"{err.message}")
                break
            log.info("transient batch error; retrying", objects=len(pending),
                     error=err.message, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])
        for name in redo:
            await self._one(name)

    def _open_sources(self, pending: list[tuple[str, str]], redo: list[str]
                      ) -> list[tuple[str, str, BinaryIO, int]]:
        """Open the batch's source files (one consistent size and content per object)."""
        job = self.job
        opened: list[tuple[str, str, BinaryIO, int]] = []
        keep: list[tuple[str, str]] = []
        try:
            for name, new in pending:
                try:
                    f = open(self.store.path(job.src, name), "rb")
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    self._error(name, "deleted from the source bucket during the job")
                    continue
                size = os.fstat(f.fileno()).st_size
                if size > BATCH_OBJECT_MAX:  # replaced by a bigger one since the listing
                    f.close()
                    redo.append(name)
                    continue
                opened.append((name, new, f, size))
                keep.append((name, new))
        except BaseException:
            for _, _, g, _ in opened:
                g.close()
            raise
        pending[:] = keep
        return opened

    async def _batch_once(self, t: Transformer, pending: list[tuple[str, str]],
                          redo: list[str]) -> None:
        """One batch request; each object answered leaves ``pending`` (done, failed, or
        in ``redo``). A transient error leaves the unanswered ones in ``pending``."""
        job = self.job
        opened = self._open_sources(pending, redo)
        if not opened:
            return
        groups: dict[str, list[tuple[str, str, bytes]]] = {}
        buffered = 0
        answered = 0
        try:
            async with open_batch(self.tsession, t, job.etl,
                                  [(f"{job.src}/{n}", f, size) for n, _, f, size in opened]
                                  ) as reply:
                for name, new, _, _ in opened:
                    status, n = await reply.next()
                    if status == BATCH_BROKEN:
                        raise BatchUnsupported(await reply.text(n))
                    if status == BATCH_FAILED:
                        text = await reply.text(n)
                        self._error(name, f"ETL {job.etl} failed on {job.src}/{name}: "
                                          f"transformer answered 500: {text}")
                    elif job.dry_run:
                        await reply.skip(n)
                        self._done(n)
                    elif n <= BATCH_OBJECT_MAX:
                        data = await reply.read(n)
                        owner = placement.owner(placement.object_key(job.dst, new),
                                                job.targets)
                        groups.setdefault(owner, []).append((name, new, data))
                        buffered += n
                    else:  # a big result: streamed on to its owner at once, never held
                        await self._store_big(name, new, reply, n, redo)
                    answered += 1
                    if buffered >= BATCH_RESULT_BYTES:
                        await self._flush(groups)
                        groups, buffered = {}, 0
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as e:
            raise UpstreamError(f"ETL {job.etl}: transformer reply to a batch broke off: "
                                f"{e or type(e).__name__}", etl=job.etl) from e
        finally:
            for _, _, f, _ in opened:
                f.close()
            del pending[:answered]
            if groups and answered:
                # results already here are stored even if the rest broke off; not when
                # cancelled (abort): then nothing more is written
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    await self._flush(groups)

    async def _store_big(self, name: str, new: str, reply: BatchReply, n: int,
                         redo: list[str]) -> None:
        left = n

        async def body() -> AsyncIterator[bytes]:
            nonlocal left
            async for chunk in reply.chunks(n):
                left -= len(chunk)
                yield chunk

        try:
            size = await self._store(new, body())
        except AisError as e:
            await reply.skip(left)  # the rest of this object's frame, to reach the next
            if e.retryable:
                redo.append(name)
            else:
                self._error(name, e.message)
            return
        self._done(size)

    async def _flush(self, groups: dict[str, list[tuple[str, str, bytes]]]) -> None:
        await asyncio.gather(*(self._put_group(owner, items) for owner, items in groups.items()))

    async def _put_group(self, owner: str, items: list[tuple[str, str, bytes]]) -> None:
        """Results owned by ``owner``, in one multi-object PUT (retried while transient)."""
        deadline = time.monotonic() + self.retry_for
        delay = self.backoff[0]
        while True:
            try:
                results = await self._put_many(owner, items)
            except AisError as e:
                if e.retryable and time.monotonic() + delay <= deadline:
                    log.info("transient error storing a batch; retrying", target=owner,
                             objects=len(items), error=e.message, delay=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
                    continue
                why = e.message if not e.retryable else \
                    f"gave up after {self.retry_for:.0f}s of retries: {e.message}"
                for name, _, _ in items:
                    self._error(name, why)
                return
            for (name, _, _), r in zip(items, results, strict=True):
                if isinstance(r, AisError):
                    self._error(name, r.message)
                else:
                    self._done(r)
            return

    async def _put_one(self, new: str, data: bytes) -> int | AisError:
        try:
            return await self._store(new, data)
        except AisError as e:
            if e.retryable:
                raise
            return e

    async def _put_many(self, owner: str, items: list[tuple[str, str, bytes]]
                        ) -> list[int | AisError]:
        """Store results on ``owner``; each one's size or error, in order."""
        job = self.job
        if owner == self.me:
            async with self.store.batch(job.dst) as b:
                for _, new, data in items:
                    b.add(new, data)
                done = await b.commit()
            return [r if isinstance(r, AisError) else r.size for _, r in done]
        peer = self.view.by_id.get(owner)
        if peer is None:
            raise Unavailable(f"target {owner}, owner of {len(items)} results, is not in the "
                              "cluster map (restarting?): retrying", target=owner)
        url = f"{peer.url}/v1/batch/objects/{urllib.parse.quote(job.dst, safe='')}"
        objs = [(new, data) for _, new, data in items]

        async def body() -> AsyncIterator[bytes]:
            for piece in frames.encode(objs):
                yield piece

        try:
            async with self.psession.put(url, data=body(), headers={
                    "Content-Length": str(frames.body_length(objs)),
                    "Content-Type": "application/octet-stream"}) as resp:
                text = await resp.read()
        except aiohttp.ClientError as e:
            raise UpstreamError(f"PUT of {len(items)} objects of {job.dst} to target {owner} "
                                f"failed: {e or type(e).__name__}", target=owner) from e
        if (resp.status == 404 and b'"HTTPNotFound"' in text) or resp.status == 405:
            # a peer without the multi-object route (another version): one PUT each
            return [await self._put_one(new, data) for _, new, data in items]
        if resp.status != 200:
            msg = text.decode(errors="replace")[:300]
            err = AisError(f"target {owner} refused {len(items)} objects of {job.dst}: HTTP "
                           f"{resp.status}: {msg}", target=owner)
            if resp.status >= 500:
                err = UpstreamError(err.message, target=owner)
            raise err
        try:
            results = json.loads(text)["results"]
            if len(results) != len(items):
                raise ValueError(f"{len(results)} results for {len(items)} objects")
            return [int(r["size"]) if "size" in r else
                    AisError(f"target {owner} refused {job.dst}/{r.get('name')}: "
                             f"{r.get('message', r)}", target=owner) for r in results]
        except (ValueError, KeyError, TypeError) as e:
            raise AisError(f"target {owner} answered a batch PUT with {text[:200]!r}: {e}",
                           target=owner) from e


SMALL_RESULT = 1 << 20
"""Results up to this size are buffered once and PUT with a Content-Length."""
BATCH_OBJECT_MAX = frames.MAX_OBJECT
"""Objects up to this size (1 MiB) go in batches when the transformer takes them."""
BATCH_COUNT = 64
"""At most this many objects per batch..."""
BATCH_BYTES = 4 << 20
"""...and a batch stops growing once its objects reach this many bytes."""
BATCH_RESULT_BYTES = 4 << 20
"""Results held for multi-object PUTs are sent once they reach this many bytes."""


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
