"""A target's offline-job routes (the gateway calls them; see ``etl.offline``).

    POST   /v1/xactions            a job record (``model.xaction.Job``): run this target's share
    GET    /v1/xactions            this target's jobs and their progress
    GET    /v1/xactions/<id>       this target's progress of one job
    DELETE /v1/xactions/<id>?reason=   abort it here; answers once nothing of it runs

Each answer is a ``model.xaction.Progress`` document (plus ``xaction``). The
jobs also follow the control store on their own (resume after a restart,
abort when the ETL is stopped), so these routes are the fast path only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from aisetl.aio import cancel_and_wait
from aisetl.etl.offline import OfflineJob, OfflineJobs
from aisetl.model.errors import InvalidRequest
from aisetl.model.xaction import Job, is_job_record
from aisetl.observability.http import METRICS
from aisetl.target.app import (
    CONTROL,
    MANAGER,
    SELF,
    SETTINGS,
    STORE,
    TRANSFORM_SESSION,
    VIEW,
)

JOBS: web.AppKey[OfflineJobs] = web.AppKey("offline_jobs", OfflineJobs)
PEERS: web.AppKey[aiohttp.ClientSession] = web.AppKey("peer_session", aiohttp.ClientSession)


def _doc(oj: OfflineJob) -> dict[str, Any]:
    return {**oj.progress.to_dict(), "xaction": oj.job.id, "etl": oj.job.etl}


async def start_job(request: web.Request) -> web.Response:
    try:
        record = json.loads(await request.read())
        if not isinstance(record, dict) or not is_job_record(record):
            raise ValueError("not an etlbck job record")
        job = Job.from_record(record)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"body: expected an etlbck job record: {e}", field="body") from e
    return web.json_response(_doc(request.app[JOBS].start(job)))


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response([_doc(oj) for oj in request.app[JOBS].jobs.values()])


async def job_progress(request: web.Request) -> web.Response:
    return web.json_response(_doc(request.app[JOBS].get(request.match_info["xid"])))


async def abort_job(request: web.Request) -> web.Response:
    reason = request.query.get("reason", "aborted by request")
    oj = await request.app[JOBS].abort(request.match_info["xid"], reason)
    return web.json_response(_doc(oj))


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    settings, me = app[SETTINGS], app[SELF]
    per_peer = max(16, settings.etl.offline_concurrency * 2)
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=per_peer)
    peers = aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                  timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                sock_read=600))

    def new_job(job: Job, attempt: int) -> OfflineJob:
        return OfflineJob(job, me=me.id, store=app[STORE], manager=app[MANAGER],
                          control=app[CONTROL], view=app[VIEW],
                          transform_session=app[TRANSFORM_SESSION], peer_session=peers,
                          metrics=app[METRICS], concurrency=settings.etl.offline_concurrency,
                          attempt=attempt)

    jobs = OfflineJobs(me.id, app[CONTROL], new_job)
    app[JOBS] = jobs
    app[PEERS] = peers
    app[VIEW].on_change(jobs.on_change)
    loop = asyncio.create_task(jobs.loop(), name="offline-jobs")
    jobs.poke()  # resume what this target was doing before it restarted
    yield
    await cancel_and_wait(loop)
    await jobs.close()
    await peers.close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_jobs)
    app.router.add_post("/v1/xactions", start_job)
    app.router.add_get("/v1/xactions", list_jobs)
    app.router.add_get("/v1/xactions/{xid}", job_progress)
    app.router.add_delete("/v1/xactions/{xid}", abort_job)
