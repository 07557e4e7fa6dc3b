"""The gateway's offline-job API: start, watch and abort ``etlbck`` jobs.

    POST   /v1/buckets/<from>   {"action": "etlbck", "name": TO, "value": {"id", "ext",
                                 "prefix", "suffix", "dry_run", "stop_on_error"}}
                                -> the job ID as text (also value.bck_to, ?bck_to=)
    GET    /v1/xactions         every job record (newest last)
    GET    /v1/xactions/<id>    status: totals and per target (``model.xaction.aggregate``)
    DELETE /v1/xactions/<id>    abort; answers with the status once no target runs it

Start: validate (400 names the field; 404 for a missing or unknown ETL or
source bucket), create the destination bucket when missing (not on a dry
run), record the job in the control store — with the live targets of this
moment, over which results are placed — and POST it to every one of them.
A target that misses the POST finds the record on its own (``etl.offline``).

Status is asked of the targets themselves: their counters are in memory and
exact at that instant, and the question costs one small GET per target. A
target that does not answer (restarting, gone) is shown from the last
report it saved in the control store, marked with a note; the control store
is also what outlives the processes. The gateway keeps nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from aisetl.gateway.app import BUCKET_ACTIONS, CONTROL, VIEW, call_target
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import (
    BucketExists,
    BucketNotFound,
    EtlNotFound,
    Unavailable,
    XactionNotFound,
)
from aisetl.model.etl import new_etl_id
from aisetl.model.xaction import (
    Job,
    Progress,
    aggregate,
    is_job_record,
    parse_etlbck,
    report_key,
)

log = structlog.get_logger("gateway.jobs")

STATUS_TIMEOUT = aiohttp.ClientTimeout(total=5)
ABORT_TIMEOUT = aiohttp.ClientTimeout(total=40)


async def start_etlbck(request: web.Request, bucket: str, msg: dict[str, Any]) -> web.Response:
    control, view = request.app[CONTROL], request.app[VIEW]
    req = parse_etlbck(bucket, msg, request.query.get("bck_to"))
    declared = [str((d.get("data") or {}).get("id", "")) for d in await control.list_etls()]
    if not req.etl:
        raise EtlNotFound("value.id: name the ETL that transforms the bucket, e.g. "
                          "{\"action\": \"etlbck\", \"name\": \"" + req.dst + "\", \"value\": "
                          "{\"id\": \"ETL_ID\"}} (running: " + (", ".join(declared) or "none")
                          + ")", field="value.id")
    if req.etl not in declared:
        raise EtlNotFound(f"ETL {req.etl!r} does not exist (value.id): start it first; "
                          "ais etl ls lists them", etl=req.etl, field="value.id")
    await view.bucket(req.src)
    targets = [t.id for t in view.targets]
    if not targets:
        raise Unavailable("no storage targets have joined yet: start targets and retry")
    if not req.dry_run:
        try:
            await view.bucket(req.dst)
        except BucketNotFound:
            try:
                await control.create_bucket(BucketInfo(name=req.dst, created=time.time()))
            except BucketExists:
                pass
    job = Job.from_request(new_etl_id(), req, targets, time.time())
    await control.put_xaction(job.id, job.to_record())
    structlog.contextvars.bind_contextvars(etl=job.etl, xaction=job.id)
    log.info("offline job created", src=job.src, dst=job.dst, dry_run=job.dry_run,
             naming=job.naming.to_dict(), targets=targets)
    body = json.dumps(job.to_record()).encode()
    live = [view.by_id[t] for t in targets]
    results = await asyncio.gather(
        *(call_target(request, t, "POST", "/v1/xactions", data=body,
                      headers={"Content-Type": "application/json"}) for t in live),
        return_exceptions=True)
    for t, r in zip(live, results, strict=True):
        if isinstance(r, BaseException) or r[0] != 200:
            why = r if isinstance(r, BaseException) else r[1][:300]
            log.warning("target did not take the job; it picks it up from the control store",
                        target=t.id, error=str(why))
    return web.Response(text=job.id)


async def _job(request: web.Request) -> Job:
    xid = request.match_info["xid"]
    rec = await request.app[CONTROL].get_xaction(xid)
    if rec is None or not is_job_record(rec):
        raise XactionNotFound(f"xaction {xid!r} does not exist (GET /v1/xactions lists them)",
                              xaction=xid)
    return Job.from_record(rec)


async def _ask(request: web.Request, t: TargetInfo, method: str, path: str,
               timeout: aiohttp.ClientTimeout, **kw: Any) -> Progress | str:
    try:
        status, body = await call_target(request, t, method, path, timeout=timeout, **kw)
    except Exception as e:
        return f"target did not answer: {e}"
    if status != 200:
        return f"target answered HTTP {status}"
    return Progress.from_dict(json.loads(body))


async def _status(request: web.Request, job: Job, method: str = "GET",
                  timeout: aiohttp.ClientTimeout = STATUS_TIMEOUT,
                  params: dict[str, str] | None = None) -> dict[str, Any]:
    control, view = request.app[CONTROL], request.app[VIEW]
    path = f"/v1/xactions/{job.id}"
    ids = list(job.targets)
    live = [view.by_id.get(t) for t in ids]
    answers = await asyncio.gather(*(
        _ask(request, t, method, path, timeout, params=params) if t is not None else
        asyncio.sleep(0, "not in the cluster map") for t in live))
    per: dict[str, Progress | None] = {}
    notes: dict[str, str] = {}
    for tid, a in zip(ids, answers, strict=True):
        if isinstance(a, Progress):
            per[tid] = a
            continue
        saved = await control.get_xaction(report_key(job.id, tid))
        p = Progress.from_dict(saved) if saved else None
        if job.aborted and a.endswith("HTTP 404"):
            # restarted after the abort: it will not resume an aborted job
            p = p or Progress(tid)
            p.finished, p.aborted = True, True
            p.reason = p.reason or "aborted while the target was away"
        per[tid] = p
        notes[tid] = f"{a}; " + ("showing its last saved report" if saved else
                                 "no report saved yet")
    return aggregate(job, per, notes)


async def job_status(request: web.Request) -> web.Response:
    return web.json_response(await _status(request, await _job(request)))


async def abort_job(request: web.Request) -> web.Response:
    job = await _job(request)
    status = await _status(request, job)
    if status["finished"]:
        return web.json_response(status)  # nothing left to abort
    reason = request.query.get("reason") or "aborted by request"
    job = job.abort(reason)
    await request.app[CONTROL].put_xaction(job.id, job.to_record())
    log.info("offline job aborted", xaction=job.id, reason=reason)
    return web.json_response(await _status(request, job, "DELETE", ABORT_TIMEOUT,
                                           {"reason": reason}))


async def list_jobs(request: web.Request) -> web.Response:
    recs = [r for r in await request.app[CONTROL].list_xactions() if is_job_record(r)]
    recs.sort(key=lambda r: float(r.get("created", 0)))
    return web.json_response(recs)


def setup(app: web.Application) -> None:
    app[BUCKET_ACTIONS]["etlbck"] = start_etlbck
    app.router.add_get("/v1/xactions", list_jobs)
    app.router.add_get("/v1/xactions/{xid}", job_status)
    app.router.add_delete("/v1/xactions/{xid}", abort_job)


__all__ = ["setup"]
