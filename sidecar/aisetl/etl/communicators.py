"""How a target talks to its transformers: hpush, hrev, hpull.

- **hpush** (``hpush://``): the target POSTs the object to the transformer
  (streamed from disk, with Content-Length, so servers that read by length —
  like the seed's md5 server — work) and streams the reply back.
- **hrev** (``hrev://``): the target reverse-proxies ``GET /<bucket>/<object>``
  to the transformer, which reads the object from ``AIS_TARGET_URL`` itself.
- **hpull** (``hpull://``): the target answers the client with a 307 to the
  transformer, which reads from the target and answers the client directly.

Bodies flow in fixed-size chunks in both directions; nothing here holds a
whole object. One pooled ``ClientSession`` per target keeps connections to
transformers alive between requests.

Offline jobs also use a **batch** request (``POST /batch``, many small objects
in one request, see ``open_batch``) with transformers that advertise it: our
python3 runtime answers ``GET /health`` with ``X-Aisetl-Batch: 1`` when its
user code is a plain ``transform``. Nothing else is assumed to speak it.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import aiohttp
from aiohttp import web

from aisetl.etl.manager import EtlManager
from aisetl.model.errors import NotFound, TransformError, UpstreamError
from aisetl.model.etl import comm_type_label
from aisetl.observability.metrics import Metrics
from aisetl.orchestrator.base import Transformer
from aisetl.settings import CHUNK_SIZE
from aisetl.storage import frames
from aisetl.storage.objects import ObjectStore

# Body chunks sent to a transformer. Measured (hack/bench.py --profile, hpush md5
# 1 MiB): with 1 MiB chunks most of each write misses the socket buffer and
# asyncio copies the rest; 256 KiB chunks cut the target's CPU per request ~40%.
HPUSH_CHUNK = 256 << 10


async def file_chunks(src: Path | BinaryIO, chunk_size: int = CHUNK_SIZE
                      ) -> AsyncIterator[bytes]:
    """A file's bytes in chunks (page-cache reads of 1 MiB take well under 1 ms).

    ``src`` is a path or an open file, which is closed when the generator ends.
    """
    with open(src, "rb") if isinstance(src, Path) else src as f:
        while chunk := f.read(chunk_size):
            yield chunk


def object_path(bucket: str, obj: str) -> str:
    return "/" + urllib.parse.quote(bucket, safe="") + "/" + urllib.parse.quote(obj, safe="/")


def hpull_location(t: Transformer, bucket: str, obj: str) -> str:
    return t.public_endpoint + object_path(bucket, obj)


async def _failure(etl_id: str, bucket: str, obj: str, r: aiohttp.ClientResponse) -> TransformError:
    text = (await r.content.read(4096)).decode(errors="replace").strip()
    err = TransformError(f"ETL {etl_id} failed on {bucket}/{obj}: transformer answered "
                         f"{r.status}: {text}", etl=etl_id, bucket=bucket, object=obj)
    if r.status == 404:
        err.status = 404
    return err


@asynccontextmanager
async def open_transform(session: aiohttp.ClientSession, t: Transformer, comm_type: str,
                         etl_id: str, store: ObjectStore, bucket: str, obj: str
                         ) -> AsyncIterator[aiohttp.ClientResponse]:
    """The transformer's 200 response for one object, ready to stream.

    hpull is treated as hrev here: this is for callers that want the bytes
    themselves (offline jobs), not a redirect.
    """
    f: BinaryIO | None = None
    try:
        if comm_type == "hpush://":
            store.head(bucket, obj)  # a clear 404 for a missing object
            # size and bytes from one open file: a PUT that replaces the object
            # meanwhile must not make Content-Length and the body disagree
            f = open(store.path(bucket, obj), "rb")
            size = os.fstat(f.fileno()).st_size
            cm = session.post(t.endpoint + "/", data=file_chunks(f, HPUSH_CHUNK),
                              headers={"Content-Length": str(size),
                                       "Content-Type": "application/octet-stream"})
        else:
            cm = session.get(t.endpoint + object_path(bucket, obj))
        async with cm as r:
            if r.status != 200:
                raise await _failure(etl_id, bucket, obj, r)
            yield r
    except (TimeoutError, aiohttp.ClientConnectionError) as e:
        raise UpstreamError(f"ETL {etl_id}: transformer at {t.endpoint} failed while "
                            f"transforming {bucket}/{obj}: {e or type(e).__name__}",
                            etl=etl_id, bucket=bucket, object=obj) from e
    finally:
        if f is not None:
            f.close()


BATCH_HEADER = "X-Aisetl-Batch"
BATCH_RESP = struct.Struct(">BQ")  # status, size; then bytes
BATCH_OK, BATCH_FAILED, BATCH_BROKEN = 0, 1, 2


async def supports_batch(session: aiohttp.ClientSession, t: Transformer) -> bool:
    """Whether ``t`` serves ``POST /batch`` (its /health answer says so explicitly)."""
    try:
        async with session.get(t.endpoint + "/health",
                               timeout=aiohttp.ClientTimeout(total=10)) as r:
            await r.read()
            return r.status == 200 and r.headers.get(BATCH_HEADER) == "1"
    except (TimeoutError, aiohttp.ClientError) as e:
        raise UpstreamError(f"transformer at {t.endpoint} did not answer /health: "
                            f"{e or type(e).__name__}", endpoint=t.endpoint) from e


class BatchUnsupported(Exception):
    """The transformer refused the batch request as such (not one of its objects)."""


class BatchReply:
    """The transformer's answer to a batch: one frame per object sent, in order."""

    def __init__(self, r: aiohttp.ClientResponse) -> None:
        self.content = r.content

    async def next(self) -> tuple[int, int]:
        """(status, size) of the next object's frame; its bytes follow."""
        head = await self.content.readexactly(BATCH_RESP.size)
        status, size = BATCH_RESP.unpack(head)
        if status not in (BATCH_OK, BATCH_FAILED, BATCH_BROKEN):
            raise BatchUnsupported(f"unknown frame status {status} in the batch reply")
        return status, size

    async def read(self, n: int) -> bytes:
        return await self.content.readexactly(n) if n else b""

    async def text(self, n: int, limit: int = 4096) -> str:
        """A frame's message (at most ``limit`` bytes kept; the rest is skipped)."""
        head = await self.read(min(n, limit))
        await self.skip(n - len(head))
        return head.decode(errors="replace").strip()

    async def chunks(self, n: int) -> AsyncIterator[bytes]:
        """A frame's ``n`` bytes in chunks (a big result streamed on, never held)."""
        while n > 0:
            chunk = await self.content.read(min(n, CHUNK_SIZE))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)
            yield chunk

    async def skip(self, n: int) -> None:
        async for _ in self.chunks(n):
            pass


def batch_body(items: list[tuple[str, BinaryIO, int]], piece: int = HPUSH_CHUNK
               ) -> Iterator[bytes]:
    """A batch request body read from open files, in pieces of about ``piece`` bytes
    (the same framing as between targets: ``storage.frames``)."""

    def read_all() -> Iterator[tuple[str, bytes]]:
        for name, f, size in items:
            data = f.read(size)
            if len(data) != size:  # files are replaced by rename, never changed in place
                raise OSError(f"{name}: read {len(data)} of {size} bytes")
            yield name, data

    return frames.encode(read_all(), piece)


@asynccontextmanager
async def open_batch(session: aiohttp.ClientSession, t: Transformer, etl_id: str,
                     items: list[tuple[str, BinaryIO, int]]) -> AsyncIterator[BatchReply]:
    """Send small objects (name, open file, size) to ``t`` in one request; its reply.

    The body is read from the files while it is sent. Raises
    ``BatchUnsupported`` when the transformer refuses the request itself (no
    such endpoint, 400), ``UpstreamError`` (retryable) when it cannot be
    reached or answers 5xx.
    """
    length = sum(frames.HEADER.size + len(n.encode()) + size for n, _, size in items)

    async def body() -> AsyncIterator[bytes]:
        for piece in batch_body(items):
            yield piece

    try:
        async with session.post(t.endpoint + "/batch", data=body(), headers={
                "Content-Length": str(length),
                "Content-Type": "application/octet-stream"}) as r:
            if r.status != 200:
                text = (await r.content.read(4096)).decode(errors="replace").strip()
                msg = f"ETL {etl_id}: transformer answered {r.status} to a batch: {text}"
                if r.status >= 500:
                    raise UpstreamError(msg, etl=etl_id)
                raise BatchUnsupported(msg)
            yield BatchReply(r)
    except (TimeoutError, aiohttp.ClientConnectionError) as e:
        raise UpstreamError(f"ETL {etl_id}: transformer at {t.endpoint} failed during a "
                            f"batch: {e or type(e).__name__}", etl=etl_id) from e


class InlineTransformer:
    """Serves ``GET /v1/objects/<b>/<o>?uuid=ETL`` on a target."""

    def __init__(self, manager: EtlManager, store: ObjectStore, session: aiohttp.ClientSession,
                 metrics: Metrics) -> None:
        self.manager = manager
        self.store = store
        self.session = session
        self.metrics = metrics

    async def __call__(self, request: web.Request, bucket: str, obj: str,
                       etl_id: str) -> web.StreamResponse:
        slot, t = await self.manager.ready(etl_id, wait=5.0)
        comm = slot.decl.comm_type
        labels = (etl_id, comm_type_label(comm))
        m = self.metrics
        m.etl_requests.labels(*labels).inc()
        start = time.perf_counter()
        meta = self.store.head(bucket, obj)  # 404 here, not from the transformer
        try:
            if comm == "hpull://":
                m.etl_bytes_in.labels(*labels).inc(meta.size)
                return web.Response(status=307,
                                    headers={"Location": hpull_location(t, bucket, obj)})
            resp = await self._stream(request, t, comm, etl_id, bucket, obj, labels)
            m.etl_bytes_in.labels(*labels).inc(meta.size)
            return resp
        except BaseException:
            m.etl_errors.labels(*labels).inc()
            raise
        finally:
            m.etl_duration.labels(*labels).observe(time.perf_counter() - start)

    async def _stream(self, request: web.Request, t: Transformer, comm: str, etl_id: str,
                      bucket: str, obj: str, labels: tuple[str, str]) -> web.StreamResponse:
        async with open_transform(self.session, t, comm, etl_id, self.store, bucket,
                                  obj) as r:
            resp = web.StreamResponse(status=200)
            resp.content_type = r.headers.get("Content-Type", "application/octet-stream")
            if r.content_length is not None:
                resp.content_length = r.content_length
            await resp.prepare(request)
            out = 0
            try:
                async for chunk in r.content.iter_chunked(CHUNK_SIZE):
                    await resp.write(chunk)
                    out += len(chunk)
            except (TimeoutError, aiohttp.ClientError) as e:
                # headers are gone already: cut the connection so the client sees an error
                if request.transport is not None:
                    request.transport.close()
                raise UpstreamError(f"ETL {etl_id}: transformer failed mid-stream on "
                                    f"{bucket}/{obj}: {e}", etl=etl_id) from e
            finally:
                self.metrics.etl_bytes_out.labels(*labels).inc(out)
            await resp.write_eof()
            return resp


async def serve_raw(request: web.Request, store: ObjectStore, secret: str,
                    bucket: str, obj: str) -> web.FileResponse:
    """``AIS_TARGET_URL/<bucket>/<object>``: the raw object, behind the secret."""
    if request.match_info.get("secret") != secret:
        raise NotFound("no such endpoint")  # a wrong secret learns nothing
    meta = store.head(bucket, obj)
    resp = web.FileResponse(store.path(bucket, obj), chunk_size=CHUNK_SIZE)
    resp.content_type = "application/octet-stream"
    resp.headers["X-Ais-Size"] = str(meta.size)
    return resp


def session_for_transformers(limit_per_host: int) -> aiohttp.ClientSession:
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=limit_per_host,
                                keepalive_timeout=60, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    return aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False)


__all__ = ["BATCH_BROKEN", "BATCH_FAILED", "BATCH_OK", "BatchReply", "BatchUnsupported",
           "InlineTransformer", "file_chunks", "open_batch", "open_transform", "serve_raw",
           "session_for_transformers", "supports_batch"]
