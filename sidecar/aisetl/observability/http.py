"""HTTP middleware shared by every aiohttp app: errors, metrics, request logs.

The one place where an ``AisError`` becomes an HTTP status and a JSON body
``{"status", "error", "message", "context"}``; handlers only raise.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from aisetl.model.errors import AisError
from aisetl.observability.metrics import Metrics

log = structlog.get_logger("http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, error: str = "Error",
                   context: dict[str, object] | None = None) -> web.Response:
    body: dict[str, object] = {"status": status, "error": error, "message": message}
    if context:
        body["context"] = context
    return web.Response(status=status, text=json.dumps(body) + "\n",
                        content_type="application/json")


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def make_middleware(role: str, metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
        structlog.contextvars.bind_contextvars(request_id=rid)
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except AisError as e:
            status = e.status
            if e.status >= 500:
                log.warning("request failed", path=request.path, status=e.status, error=e.message)
            return error_response(e.status, e.message, type(e).__name__, e.context)
        except web.HTTPException as e:
            status = e.status
            if e.status < 400:
                raise
            return error_response(e.status, e.reason or e.text or "", type(e).__name__)
        finally:
            route = _route_name(request)
            metrics.http_requests.labels(role, request.method, route, str(status)).inc()
            metrics.http_duration.labels(role, request.method, route).observe(
                time.perf_counter() - start)
            structlog.contextvars.unbind_contextvars("request_id", "etl")

    return middleware


async def metrics_handler(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics: Metrics = request.app[METRICS]
    return web.Response(body=generate_latest(metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
