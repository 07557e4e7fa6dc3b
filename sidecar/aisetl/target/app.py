"""The target's aiohttp app: object I/O, local listings, health, metrics.

Routes (a gateway redirects clients here; peers call them directly)::

    PUT|GET|HEAD|DELETE /v1/objects/<bucket>/<object>   one object
    PUT    /v1/batch/objects/<bucket>                    several small objects (peers; framing
                                                         in ``storage.frames``)
    GET    /v1/buckets/<bucket>?prefix=&start_after=&limit=   this target's listing
    DELETE /v1/buckets/<bucket>                          drop this target's data of a bucket
    GET    /v1/etl/objects/<secret>/<bucket>/<object>    raw object (AIS_TARGET_URL)
    GET    /v1/etl/local                                 this target's ETL statuses
    GET    /v1/etl/<id>/logs?tail=N                      its transformer's last log lines
    GET    /v1/health                                    200 once joined
    GET    /metrics                                      Prometheus text

Handlers hold no business rules: storage decides what is valid, the
middleware decides what an error looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from aisetl.aio import cancel_and_wait
from aisetl.control.base import ControlStore
from aisetl.control.view import ClusterView
from aisetl.etl.communicators import InlineTransformer, serve_raw, session_for_transformers
from aisetl.etl.manager import EtlManager
from aisetl.model.cluster import TargetInfo
from aisetl.model.errors import AisError, InvalidRequest, ObjectNotFound
from aisetl.model.names import validate_bucket
from aisetl.observability.http import METRICS, make_middleware, metrics_handler
from aisetl.observability.metrics import Metrics
from aisetl.orchestrator.base import Orchestrator, TransformerContext
from aisetl.settings import CHUNK_SIZE, TargetSettings
from aisetl.storage import frames
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


async def put_batch(request: web.Request) -> web.Response:
    """Several small objects in one request (offline jobs send results to their owner).

    Each object is written as by a single PUT (temporary file, fsync, checksum,
    rename), all of them committed together once the whole body has arrived:
    a body that breaks off or is malformed (400) installs nothing, and neither
    does one whose sender went away before the commit (an aborted job). An
    object is only answered as written after its fsync and rename.
    """
    bucket = validate_bucket(request.match_info["bucket"])
    await request.app[VIEW].bucket(bucket)
    store = request.app[STORE]
    async with store.batch(bucket) as batch:
        async for name, data in frames.read_frames(request.content):
            batch.add(name, data)
        results = await batch.commit(lambda: request.transport is not None)
    m = request.app[METRICS]
    out: list[dict[str, object]] = []
    for name, r in results:
        if isinstance(r, AisError):
            out.append({"name": name, **r.to_dict()})
            continue
        m.object_requests.labels("put").inc()
        m.object_bytes.labels("put").inc(r.size)
        out.append({"name": r.name, "size": r.size, "checksum": r.checksum})
    return web.json_response({"results": out})


def _meta_headers(size: int, cksum: str) -> dict[str, str]:
    return {"X-Ais-Size": str(size), "X-Ais-Checksum-Type": CKSUM_TYPE,
            "X-Ais-Checksum-Value": cksum}


LOCAL_ONLY = "X-Aisetl-Local-Only"


async def _elsewhere(request: web.Request, bucket: str, obj: str) -> web.Response | None:
    """A redirect to the live target that holds an object placed elsewhere, if any.

    HRW places by the targets that are live now; an object written while the
    map was different (a target joined, or came back under another ID) still
    sits where it was written. Rather than a false 404, the owner asks its
    peers once (they do not ask further) and redirects to the holder.
    """
    if request.headers.get(LOCAL_ONLY):
        return None
    me = request.app[SELF].id
    session = request.app[TRANSFORM_SESSION]
    # a rare path (a miss): read membership afresh rather than trust the cached view
    peers = [t for t in await request.app[CONTROL].live_targets() if t.id != me]

    async def probe(url: str) -> bool:
        try:
            async with session.head(url + request.path, headers={LOCAL_ONLY: "1"},
                                    timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    found = await asyncio.gather(*(probe(t.url) for t in peers))
    for t, ok in zip(peers, found, strict=True):
        if ok:
            return web.Response(status=307, headers={"Location": t.url + request.path_qs})
    return None


async def get_object(request: web.Request) -> web.StreamResponse:
    bucket, obj = await _existing(request)
    etl_id = request.query.get("uuid") or request.query.get("etl_name")
    try:
        if etl_id:
            structlog.contextvars.bind_contextvars(etl=etl_id)
            return await request.app[INLINE](request, bucket, obj, etl_id)
        return await serve_object(request, bucket, obj)
    except ObjectNotFound:
        redirect = await _elsewhere(request, bucket, obj)
        if redirect is None:
            raise
        return redirect


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
    try:
        meta = request.app[STORE].head(bucket, obj)
    except ObjectNotFound:
        redirect = await _elsewhere(request, bucket, obj)
        if redirect is None:
            raise
        return redirect
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
    request.app[VIEW].buckets.pop(bucket, None)  # next requests re-read the store
    trash = request.app[STORE].destroy_bucket(bucket)
    if trash is not None:
        await asyncio.to_thread(shutil.rmtree, trash, True)
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
    await cancel_and_wait(task)
    with contextlib.suppress(Exception):
        await control.leave(me.id)


async def _view(app: web.Application) -> AsyncIterator[None]:
    task = await app[VIEW].start()
    yield
    await ClusterView.stop(task)


# --- ETL ---------------------------------------------------------------------------------
async def raw_for_transformer(request: web.Request) -> web.StreamResponse:
    bucket, obj = _names(request)
    store = request.app[STORE]
    store.path(bucket, obj)
    return await serve_raw(request, store, request.app[SECRET], bucket, obj)


async def etl_logs(request: web.Request) -> web.Response:
    slot = request.app[MANAGER].get(request.match_info["etl_id"])
    try:
        tail = int(request.query.get("tail", "200"))
    except ValueError as e:
        raise InvalidRequest("tail: must be a whole number of lines", field="tail") from e
    t = slot.transformer
    text = await t.logs(tail) if t is not None else f"(no transformer: {slot.status.reason})"
    return web.Response(text=text)


async def etl_local(request: web.Request) -> web.Response:
    slots = request.app[MANAGER].slots
    return web.json_response({i: s.status.to_dict() for i, s in slots.items()})


def _make_orchestrator(settings: TargetSettings, session: aiohttp.ClientSession
                       ) -> Orchestrator:
    if settings.orchestrator == "kubernetes":
        from aisetl.orchestrator import kubernetes as k8s

        return k8s.KubernetesOrchestrator.from_environment(session)
    from aisetl.orchestrator.local import LocalOrchestrator

    return LocalOrchestrator(settings.etl.runtimes_dir, session, settings.etl.workers,
                             settings.etl.container_engine)


async def _etl(app: web.Application) -> AsyncIterator[None]:
    settings, me = app[SETTINGS], app[SELF]
    session = session_for_transformers(settings.etl.connections_per_transformer)
    orchestrator = _make_orchestrator(settings, session)
    ctx = TransformerContext(target_id=me.id, target_url=me.url, secret=app[SECRET],
                             work_dir=settings.data_dir / "etl",
                             cache_dir=settings.state_dir / "cache", node=me.node)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    await orchestrator.cleanup_stale(ctx)
    manager = EtlManager(app[CONTROL], orchestrator, ctx, app[METRICS], settings.etl)
    app[MANAGER] = manager
    app[TRANSFORM_SESSION] = session
    app[INLINE] = InlineTransformer(manager, app[STORE], session, app[METRICS])
    app[VIEW].on_change(manager.on_change)
    yield
    await manager.close()
    await orchestrator.close()
    await session.close()


SECRET: web.AppKey[str] = web.AppKey("secret", str)
MANAGER: web.AppKey[EtlManager] = web.AppKey("manager", EtlManager)
INLINE: web.AppKey[InlineTransformer] = web.AppKey("inline", InlineTransformer)
TRANSFORM_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("tsession",
                                                                  aiohttp.ClientSession)

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
    app[SECRET] = secrets.token_urlsafe(18)
    app.cleanup_ctx.append(_etl)  # registers its watch listener before the view starts
    app.cleanup_ctx.append(_view)
    app.cleanup_ctx.append(_heartbeat)
    app.router.add_put(OBJ, put_object)
    app.router.add_put("/v1/batch/objects/{bucket}", put_batch)
    app.router.add_get(OBJ, get_object, allow_head=False)
    app.router.add_head(OBJ, head_object)
    app.router.add_delete(OBJ, delete_object)
    app.router.add_get("/v1/buckets/{bucket}", list_local)
    app.router.add_delete("/v1/buckets/{bucket}", destroy_local)
    app.router.add_get("/v1/etl/objects/{secret}/{bucket}/{obj:.+}", raw_for_transformer)
    app.router.add_get("/v1/etl/local", etl_local)
    app.router.add_get("/v1/etl/{etl_id}/logs", etl_logs)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_handler)
    from aisetl.target import jobs

    jobs.setup(app)
    return app
