"""The gateway's aiohttp app. It never carries object bytes.

Object requests get a 307 to the owner target (HRW over live targets), so
``curl -L`` and ordinary HTTP clients follow it; a PUT that announces its body
with ``Expect: 100-continue`` gets the 307 before sending a single byte.
Bucket and cluster requests are answered here by fanning out to targets.

Routes::

    PUT|GET|HEAD|DELETE /v1/objects/<bucket>/<object>    307 to the owner target
    POST   /v1/buckets/<bucket>   {"action": "create-bck"} | {"action": "etlbck", ...}
    DELETE /v1/buckets/<bucket>   destroy the bucket and its objects
    HEAD   /v1/buckets/<bucket>   does it exist
    GET    /v1/buckets            list buckets
    GET    /v1/buckets/<bucket>?prefix=&page_size=&continuation_token=   list objects
    GET    /v1/cluster/map        live targets (also /v1/daemon?what=smap)
    GET    /v1/health             200 once the expected targets have joined
    GET    /metrics
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from aisetl.control.base import ControlStore
from aisetl.control.view import ClusterView
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import AisError, InvalidRequest, UpstreamError
from aisetl.model.names import validate_bucket, validate_object
from aisetl.observability.http import METRICS, make_middleware, metrics_handler
from aisetl.observability.metrics import Metrics
from aisetl.settings import GatewaySettings

log = structlog.get_logger("gateway")

SETTINGS: web.AppKey[GatewaySettings] = web.AppKey("settings", GatewaySettings)
CONTROL: web.AppKey[ControlStore] = web.AppKey("control", ControlStore)
VIEW: web.AppKey[ClusterView] = web.AppKey("view", ClusterView)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
BUCKET_ACTIONS: web.AppKey[dict[str, Any]] = web.AppKey("bucket_actions", dict)

BucketAction = Callable[[web.Request, str, dict[str, Any]], Awaitable[web.StreamResponse]]


# --- objects: redirect only -------------------------------------------------------------
async def redirect_object(request: web.Request) -> web.Response:
    bucket, obj = request.match_info["bucket"], request.match_info["obj"]
    validate_bucket(bucket)
    validate_object(obj, bucket)
    if request.method == "PUT":
        await request.app[VIEW].bucket(bucket)
    owner = request.app[VIEW].owner(bucket, obj)
    return web.Response(status=307, headers={"Location": owner.url + request.path_qs})


async def expect_redirect(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` with the redirect itself: no body reaches us."""
    try:
        return await redirect_object(request)
    except AisError as e:
        from aisetl.observability.http import error_response

        return error_response(e.status, e.message, type(e).__name__, e.context)


# --- fan-out helpers ----------------------------------------------------------------------
async def call_target(request: web.Request, t: TargetInfo, method: str, path: str,
                      **kw: Any) -> tuple[int, bytes]:
    try:
        async with request.app[SESSION].request(method, t.url + path, **kw) as r:
            return r.status, await r.read()
    except (TimeoutError, aiohttp.ClientError) as e:
        raise UpstreamError(f"target {t.id} ({t.url}) did not answer {method} {path}: {e}",
                            target=t.id) from e


def _raise_for(t: TargetInfo, status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        msg = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        msg = body.decode(errors="replace")[:300]
    err = AisError(f"target {t.id}: {msg}", target=t.id)
    err.status = status
    raise err


# --- buckets ------------------------------------------------------------------------------
async def bucket_post(request: web.Request) -> web.StreamResponse:
    bucket = validate_bucket(request.match_info["bucket"])
    try:
        msg = await request.json() if request.can_read_body else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest("body: not JSON: send e.g. {\"action\": \"create-bck\"}",
                             field="body") from e
    if not isinstance(msg, dict):
        raise InvalidRequest("body: expected a JSON object with an 'action'", field="action")
    action = msg.get("action")
    handlers: dict[str, BucketAction] = request.app[BUCKET_ACTIONS]
    if action not in handlers:
        raise InvalidRequest(f"action: {action!r} is not a bucket action: use one of "
                             f"{', '.join(sorted(handlers))}", field="action")
    return await handlers[action](request, bucket, msg)


async def create_bucket(request: web.Request, bucket: str, msg: dict[str, Any]
                        ) -> web.Response:
    await request.app[CONTROL].create_bucket(BucketInfo(name=bucket, created=time.time()))
    return web.Response(status=200)


async def destroy_bucket(request: web.Request) -> web.Response:
    bucket = validate_bucket(request.match_info["bucket"])
    await request.app[CONTROL].delete_bucket(bucket)
    request.app[VIEW].buckets.pop(bucket, None)
    targets = request.app[VIEW].targets
    results = await asyncio.gather(
        *(call_target(request, t, "DELETE", f"/v1/buckets/{bucket}") for t in targets),
        return_exceptions=True)
    for t, r in zip(targets, results, strict=True):
        if isinstance(r, BaseException):
            log.warning("target kept data of destroyed bucket", target=t.id, error=str(r))
    return web.Response(status=200)


async def head_bucket(request: web.Request) -> web.Response:
    b = await request.app[VIEW].bucket(validate_bucket(request.match_info["bucket"]))
    return web.Response(status=200, headers={"X-Ais-Bucket-Provider": b.provider})


async def list_buckets(request: web.Request) -> web.Response:
    buckets = await request.app[CONTROL].list_buckets()
    return web.json_response([{"name": b.name, "provider": b.provider, "created": b.created}
                              for b in buckets])


async def list_objects(request: web.Request) -> web.Response:
    bucket = validate_bucket(request.match_info["bucket"])
    await request.app[VIEW].bucket(bucket)
    q = request.query
    try:
        page_size = int(q.get("page_size", "1000"))
    except ValueError as e:
        raise InvalidRequest("page_size: must be a whole number, e.g. 1000",
                             field="page_size") from e
    page_size = max(1, min(page_size, 100_000))
    params = {"prefix": q.get("prefix", ""), "start_after": q.get("continuation_token", ""),
              "limit": str(page_size)}
    if q.get("checksums") == "true":
        params["checksums"] = "true"
    targets = request.app[VIEW].targets
    pages = await asyncio.gather(*(call_target(request, t, "GET", f"/v1/buckets/{bucket}",
                                               params=params) for t in targets))
    lists = []
    more = False
    for t, (status, body) in zip(targets, pages, strict=True):
        _raise_for(t, status, body)
        entries = json.loads(body)["entries"]
        more = more or len(entries) >= page_size
        lists.append(entries)
    merged = list(heapq.merge(*lists, key=lambda e: e["name"]))
    more = more or len(merged) > page_size
    merged = merged[:page_size]
    token = merged[-1]["name"] if more and merged else ""
    return web.json_response({"entries": merged, "continuation_token": token})


# --- cluster --------------------------------------------------------------------------------
async def cluster_map(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    return web.json_response({"targets": [t.to_dict() for t in view.targets]})


async def health(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    want = max(1, request.app[SETTINGS].expect_targets)
    have = len(view.targets)
    ok = have >= want
    return web.json_response({"targets": have, "expected": want, "ok": ok},
                             status=200 if ok else 503)


# --- lifecycle ------------------------------------------------------------------------------
async def _session(app: web.Application) -> AsyncIterator[None]:
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=300)) as s:
        app[SESSION] = s
        yield


async def _view(app: web.Application) -> AsyncIterator[None]:
    task = await app[VIEW].start()
    yield
    await ClusterView.stop(task)


OBJ = "/v1/objects/{bucket}/{obj:.+}"


def create_app(settings: GatewaySettings, control: ControlStore,
               metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics.create()
    app = web.Application(middlewares=[make_middleware("gateway", metrics)],
                          client_max_size=4 << 20)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CONTROL] = control
    app[VIEW] = ClusterView(control)
    app[BUCKET_ACTIONS] = {"create-bck": create_bucket}
    app.cleanup_ctx.append(_session)
    app.cleanup_ctx.append(_view)
    for method in ("GET", "PUT", "DELETE"):
        app.router.add_route(method, OBJ, redirect_object, expect_handler=expect_redirect)
    app.router.add_route("HEAD", OBJ, redirect_object)
    app.router.add_post("/v1/buckets/{bucket}", bucket_post)
    app.router.add_delete("/v1/buckets/{bucket}", destroy_bucket)
    app.router.add_head("/v1/buckets/{bucket}", head_bucket)
    app.router.add_get("/v1/buckets/{bucket}", list_objects, allow_head=False)
    app.router.add_get("/v1/buckets", list_buckets)
    app.router.add_get("/v1/buckets/", list_buckets)
    app.router.add_get("/v1/cluster/map", cluster_map)
    app.router.add_get("/v1/daemon", cluster_map)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_handler)
    from aisetl.gateway import etl, jobs

    etl.setup(app)
    jobs.setup(app)
    return app
