"""The target's aiohttp app: object I/O, local listings, health, metrics.

Routes (a gateway redirects clients here; peers call them directly)::

    PUT|GET|HEAD|DELETE /v1/objects/<bucket>/<object>   one object
    GET    /v1/buckets/<bucket>?prefix=&start_after=&limit=   this target's listing
    DELETE /v1/buckets/<bucket>                          drop this target's data of a bucket
    GET    /v1/health                                    200 once joined
    GET    /metrics                                      Prometheus text

Handlers hold no business rules: storage decides what is valid, the
middleware decides what an error looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from aisetl.control.base import ControlStore
from aisetl.control.view import ClusterView
from aisetl.model.cluster import TargetInfo
from aisetl.model.errors import InvalidRequest
from aisetl.model.names import validate_bucket
from aisetl.observability.http import METRICS, make_middleware, metrics_handler
from aisetl.observability.metrics import Metrics
from aisetl.settings import CHUNK_SIZE, TargetSettings
from aisetl.storage.objects import CKSUM_TYPE, ObjectStore

log = structlog.get_logger("target")

SETTINGS: web.AppKey[TargetSettings] = web.AppKey("settings", TargetSettings)
STORE: web.AppKey[ObjectStore] = web.AppKey("store", ObjectStore)
CONTROL: web.AppKey[ControlStore] = web.AppKey("control", ControlStore)
VIEW: web.AppKey[ClusterView] = web.AppKey("view", ClusterView)
SELF: web.AppKey[TargetInfo] = web.AppKey("self", TargetInfo)


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["bucket"], request.match_info["obj"]


async def _existing(request: web.Request) -> tuple[str, str]:
    """Names of the addressed object, validated, in a bucket that exists."""
    bucket, obj = _names(request)
    request.app[STORE].path(bucket, obj)
    await request.app[VIEW].bucket(bucket)
    return bucket, obj


async def put_object(request: web.Request) -> web.Response:
    bucket, obj = await _existing(request)
    store = request.app[STORE]
    meta = await store.put(bucket, obj, request.content.iter_chunked(CHUNK_SIZE))
    m = request.app[METRICS]
    m.object_requests.labels("put").inc()
    m.object_bytes.labels("put").inc(meta.size)
    return web.Response(status=200, headers={
        "X-Ais-Checksum-Type": CKSUM_TYPE, "X-Ais-Checksum-Value": meta.checksum,
        "X-Ais-Size": str(meta.size)})


def _meta_headers(size: int, cksum: str) -> dict[str, str]:
    return {"X-Ais-Size": str(size), "X-Ais-Checksum-Type": CKSUM_TYPE,
            "X-Ais-Checksum-Value": cksum}


async def get_object(request: web.Request) -> web.StreamResponse:
    bucket, obj = await _existing(request)
    etl_id = request.query.get("uuid") or request.query.get("etl_name")
    if etl_id:
        transform = request.app.get(INLINE_TRANSFORM)
        if transform is None:
            raise InvalidRequest("this target runs no ETLs", etl=etl_id)
        return await transform(request, bucket, obj, etl_id)
    return await serve_object(request, bucket, obj)


async def serve_object(request: web.Request, bucket: str, obj: str) -> web.StreamResponse:
    """Send the raw object with sendfile (also used by AIS_TARGET_URL)."""
    store = request.app[STORE]
    meta = store.head(bucket, obj)
    m = request.app[METRICS]
    m.object_requests.labels("get").inc()
    m.object_bytes.labels("get").inc(meta.size)
    resp = web.FileResponse(store.path(bucket, obj), chunk_size=CHUNK_SIZE,
                            headers=_meta_headers(meta.size, meta.checksum))
    resp.content_type = "application/octet-stream"
    return resp


async def head_object(request: web.Request) -> web.Response:
    bucket, obj = await _existing(request)
    meta = request.app[STORE].head(bucket, obj)
    request.app[METRICS].object_requests.labels("head").inc()
    headers = _meta_headers(meta.size, meta.checksum)
    headers["Content-Length"] = str(meta.size)
    return web.Response(status=200, headers=headers)


async def delete_object(request: web.Request) -> web.Response:
    bucket, obj = await _existing(request)
    await request.app[STORE].delete(bucket, obj)
    request.app[METRICS].object_requests.labels("delete").inc()
    return web.Response(status=200)


async def list_local(request: web.Request) -> web.Response:
    bucket = validate_bucket(request.match_info["bucket"])
    await request.app[VIEW].bucket(bucket)
    q = request.query
    try:
        limit = int(q.get("limit", "1000"))
    except ValueError as e:
        raise InvalidRequest("limit: must be a whole number, e.g. 1000", field="limit") from e
    entries = await asyncio.to_thread(
        request.app[STORE].listing, bucket, q.get("prefix", ""), q.get("start_after", ""),
        max(1, min(limit, 100_000)), q.get("checksums") == "true")
    return web.json_response({"entries": [e.to_dict() for e in entries]})


async def destroy_local(request: web.Request) -> web.Response:
    bucket = validate_bucket(request.match_info["bucket"])
    await asyncio.to_thread(request.app[STORE].destroy_bucket, bucket)
    return web.Response(status=200)


async def health(request: web.Request) -> web.Response:
    me = request.app[SELF]
    joined = me.id in request.app[VIEW].by_id
    return web.json_response({"id": me.id, "url": me.url, "joined": joined},
                             status=200 if joined else 503)


async def _heartbeat(app: web.Application) -> AsyncIterator[None]:
    control, me = app[CONTROL], app[SELF]
    interval = app[SETTINGS].cluster.heartbeat_interval

    async def beat() -> None:
        while True:
            try:
                await control.heartbeat(me)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(interval)

    await control.heartbeat(me)
    task = asyncio.create_task(beat(), name="heartbeat")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(Exception):
        await control.leave(me.id)


async def _view(app: web.Application) -> AsyncIterator[None]:
    task = await app[VIEW].start()
    yield
    await ClusterView.stop(task)


# Set by the ETL layer: (request, bucket, obj, etl_id) -> response.
InlineTransform = Callable[[web.Request, str, str, str], Awaitable[web.StreamResponse]]
INLINE_TRANSFORM: web.AppKey[InlineTransform] = web.AppKey("inline_transform")

OBJ = "/v1/objects/{bucket}/{obj:.+}"


def create_app(settings: TargetSettings, control: ControlStore, me: TargetInfo,
               metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics.create()
    app = web.Application(middlewares=[make_middleware("target", metrics)],
                          client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CONTROL] = control
    app[SELF] = me
    app[STORE] = ObjectStore(settings.data_dir)
    app[VIEW] = ClusterView(control)
    app.cleanup_ctx.append(_view)
    app.cleanup_ctx.append(_heartbeat)
    app.router.add_put(OBJ, put_object)
    app.router.add_get(OBJ, get_object, allow_head=False)
    app.router.add_head(OBJ, head_object)
    app.router.add_delete(OBJ, delete_object)
    app.router.add_get("/v1/buckets/{bucket}", list_local)
    app.router.add_delete("/v1/buckets/{bucket}", destroy_local)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_handler)
    return app
