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
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import AsyncIterator
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


__all__ = ["InlineTransformer", "file_chunks", "open_transform", "serve_raw",
           "session_for_transformers"]
