"""The gateway's ETL API, as in the seed's table (plus status and logs).

    POST   /v1/etl/init          pod spec YAML (curl -T spec.yaml); ?name=ID to choose the ID
    POST   /v1/etl/build         {"code", "dependencies", "runtime", "id"?, ...}
    GET    /v1/etl/list          every ETL with its state across targets
    GET    /v1/etl/<id>          status per target
    GET    /v1/etl/logs/<id>     each target's transformer log tail (?tail=N&target=ID)
    DELETE /v1/etl/stop/<id>     stop it everywhere

init and build store one declaration document, then wait until every live
target reports Ready (answer: the ETL ID as text), any target reports Failed,
or ``wait_timeout`` passes. On failure — or if the client goes away — the
declaration is deleted, which makes every target stop what it started, and
the answer names every target's reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import structlog
from aiohttp import web

from aisetl.control.base import ControlStore
from aisetl.gateway.app import CONTROL, VIEW, call_target
from aisetl.model.errors import (
    Conflict,
    EtlFailed,
    EtlNotFound,
    EtlTimeout,
    InvalidRequest,
    Unavailable,
)
from aisetl.model.etl import (
    EtlDeclaration,
    from_document,
    parse_build,
    parse_init,
    to_document,
    validate_etl_id,
)
from aisetl.model.reconcile import FAILED, READY, EtlStatus, fingerprint, overall

log = structlog.get_logger("gateway.etl")

STARTUP_GRACE = 15.0  # seconds on top of wait_timeout for targets to notice and report
FAILURE_GRACE = 5.0  # after a first Failed, how long to wait for the other targets' reasons


async def _find(control: ControlStore, etl_id: str) -> dict[str, Any]:
    for doc in await control.list_etls():
        if (doc.get("data") or {}).get("id") == etl_id:
            return doc
    raise EtlNotFound(f"ETL {etl_id!r} does not exist (ais etl ls lists them)", etl=etl_id)


async def _statuses(control: ControlStore, etl_id: str, fp: str) -> dict[str, EtlStatus]:
    out = {}
    for tid, d in (await control.etl_statuses(etl_id)).items():
        st = EtlStatus.from_dict(d)
        if st.fingerprint in ("", fp):  # ignore leftovers of an earlier ETL of this ID
            out[tid] = st
    return out


async def deploy(request: web.Request, decl: EtlDeclaration) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    if not view.targets:
        raise Unavailable("no storage targets have joined yet: start targets and retry")
    decl = replace(decl, created=time.time())
    doc = to_document(decl)
    fp = fingerprint(doc)
    await control.create_etl(doc)
    structlog.contextvars.bind_contextvars(etl=decl.id)
    log.info("ETL declared; waiting for targets", kind=decl.kind, wait_timeout=decl.wait_timeout)
    deadline = time.monotonic() + decl.wait_timeout_seconds + STARTUP_GRACE
    ok = False
    failed_at = 0.0
    try:
        while True:
            targets = [t.id for t in view.targets]
            if not any((d.get("data") or {}).get("id") == decl.id
                       for d in await control.list_etls()):
                raise Conflict(f"ETL {decl.id} was stopped while it was starting", etl=decl.id)
            statuses = await _statuses(control, decl.id, fp)
            state, reasons = overall(statuses, targets)
            if state == READY:
                ok = True
                return web.Response(text=decl.id + "\n")
            if state == FAILED:
                # give the other targets a moment to report too: the answer names
                # every target's reason, not only the first one's
                failed_at = failed_at or time.monotonic()
                pending = [t for t in targets
                           if statuses.get(t, EtlStatus()).state not in (READY, FAILED)]
                if not pending or time.monotonic() - failed_at >= FAILURE_GRACE:
                    errors = {s.error for s in statuses.values() if s.state == FAILED}
                    cls = EtlTimeout if errors == {"EtlTimeout"} else EtlFailed
                    raise cls(f"ETL {decl.id} failed to start:\n" + "\n".join(reasons),
                              etl=decl.id)
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = [t for t in targets if statuses.get(t, EtlStatus()).state != READY]
                raise EtlTimeout(f"ETL {decl.id} was not ready within {decl.wait_timeout} "
                                 f"(wait_timeout) on targets {', '.join(waiting)}",
                                 etl=decl.id)
            await view.wait_change(min(left, 0.2 if failed_at else 1.0))
    finally:
        if not ok:
            # failed, timed out, or the client went away: leave nothing behind
            await asyncio.shield(_undeclare(control, decl.id))


async def _undeclare(control: ControlStore, etl_id: str) -> None:
    try:
        await control.delete_etl(etl_id)
    except EtlNotFound:
        pass


async def init_etl(request: web.Request) -> web.Response:
    body = await request.text()
    name = request.query.get("name") or request.query.get("id")
    decl = parse_init(body, etl_id=validate_etl_id(name, "name") if name else None,
                      comm_type=request.query.get("communication_type"),
                      wait_timeout=request.query.get("wait_timeout"))
    return await deploy(request, decl)


async def build_etl(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body: not JSON ({e}): send {{\"code\": ..., \"runtime\": "
                             "\"python3\"}", field="body") from e
    return await deploy(request, parse_build(body))


async def list_etls(request: web.Request) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    targets = [t.id for t in view.targets]
    out = []
    for doc in await control.list_etls():
        try:
            decl = from_document(doc)
        except InvalidRequest as e:
            out.append({"id": (doc.get("data") or {}).get("id"), "state": FAILED,
                        "reason": e.message})
            continue
        statuses = await _statuses(control, decl.id, fingerprint(doc))
        state, _ = overall(statuses, targets)
        out.append({**decl.summary(), "state": state})
    return web.json_response(out)


async def etl_status(request: web.Request) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    etl_id = request.match_info["etl_id"]
    doc = await _find(control, etl_id)
    decl = from_document(doc)
    targets = [t.id for t in view.targets]
    statuses = await _statuses(control, etl_id, fingerprint(doc))
    state, reasons = overall(statuses, targets)
    return web.json_response({**decl.summary(), "state": state, "reasons": reasons,
                              "targets": {t: statuses.get(t, EtlStatus()).to_dict()
                                          for t in targets}})


async def etl_logs(request: web.Request) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    etl_id = request.match_info["etl_id"]
    await _find(control, etl_id)
    only = request.query.get("target")
    targets = [t for t in view.targets if not only or t.id == only]
    if only and not targets:
        raise InvalidRequest(f"target: {only!r} is not a live target (ais show cluster)",
                             field="target")
    tail = request.query.get("tail", "200")
    results = await asyncio.gather(
        *(call_target(request, t, "GET", f"/v1/etl/{etl_id}/logs", params={"tail": tail})
          for t in targets), return_exceptions=True)
    out = {}
    for t, r in zip(targets, results, strict=True):
        if isinstance(r, BaseException):
            out[t.id] = f"(unavailable: {r})"
        else:
            status, body = r
            out[t.id] = body.decode(errors="replace") if status == 200 else \
                f"(unavailable: HTTP {status}: {body.decode(errors='replace')[:200]})"
    return web.json_response(out)


async def stop_etl(request: web.Request) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    etl_id = request.match_info["etl_id"]
    await control.delete_etl(etl_id)
    # wait (bounded) until no target still runs it, so "stopped" means stopped
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        targets = list(view.targets)
        results = await asyncio.gather(
            *(call_target(request, t, "GET", "/v1/etl/local") for t in targets),
            return_exceptions=True)
        still = [t.id for t, r in zip(targets, results, strict=True)
                 if not isinstance(r, BaseException) and r[0] == 200
                 and etl_id in json.loads(r[1])]
        if not still:
            break
        await view.wait_change(0.2)
    return web.Response(text="")


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/etl/init", init_etl)
    app.router.add_put("/v1/etl/init", init_etl)
    app.router.add_post("/v1/etl/build", build_etl)
    app.router.add_put("/v1/etl/build", build_etl)
    app.router.add_get("/v1/etl/list", list_etls)
    app.router.add_get("/v1/etl/logs/{etl_id}", etl_logs)
    app.router.add_delete("/v1/etl/stop/{etl_id}", stop_etl)
    app.router.add_get("/v1/etl/{etl_id}", etl_status)
