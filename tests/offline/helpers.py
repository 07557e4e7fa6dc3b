"""Helpers for offline-job tests: fast bulk uploads, ETL builds, job status."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import urllib.parse
from typing import Any

import aiohttp

from aisetl.model import placement
from tests.etl.helpers import MD5_CODE
from tests.etl.helpers import build as build_etl
from tests.support.cluster import LocalCluster, http, wait_until

__all__ = ["MD5_CODE", "build"]

# Fails on objects whose content starts with b"bad"; otherwise md5.
FLAKY_CODE = """\
import hashlib

def transform(input_bytes):
    if input_bytes.startswith(b"bad"):
        raise ValueError("refusing a bad object")
    return hashlib.md5(input_bytes).hexdigest().encode()
"""

# Slow: ~SLOW seconds per object, then md5.
SLOW_CODE = """\
import hashlib, time

def transform(input_bytes):
    time.sleep(0.05)
    return hashlib.md5(input_bytes).hexdigest().encode()
"""


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).hexdigest().encode()


def build(c: LocalCluster, code: str, etl_id: str, **extra: Any) -> str:
    status, out = build_etl(c, code, id=etl_id, **extra)
    assert status == 200, out
    return out.strip()


def stop_etl(c: LocalCluster, etl_id: str) -> None:
    status, body, _ = http("DELETE", f"{c.endpoint}/v1/etl/stop/{etl_id}", timeout=60)
    assert status == 200, body


def create_bucket(c: LocalCluster, name: str) -> None:
    status, body, _ = http("POST", f"{c.endpoint}/v1/buckets/{name}",
                           b'{"action": "create-bck"}')
    assert status in (200, 409), body


def bucket_exists(c: LocalCluster, name: str) -> bool:
    return http("HEAD", f"{c.endpoint}/v1/buckets/{name}")[0] == 200


def put_many(c: LocalCluster, bucket: str, objects: dict[str, bytes],
             concurrency: int = 32) -> None:
    """Store objects straight on their HRW owners (what the gateway would redirect to)."""
    create_bucket(c, bucket)
    urls = {t["id"]: t["url"] for t in c.smap()}

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as s:
            async def one(name: str, data: bytes) -> None:
                owner = placement.owner(placement.object_key(bucket, name), urls)
                url = f"{urls[owner]}/v1/objects/{bucket}/{urllib.parse.quote(name)}"
                body = io.BytesIO(data) if len(data) > 1 << 20 else data  # aiohttp warns
                async with sem, s.put(url, data=body) as r:
                    assert r.status == 200, await r.text()

            await asyncio.gather(*(one(n, d) for n, d in objects.items()))

    asyncio.run(main())


def list_all(c: LocalCluster, bucket: str) -> dict[str, int]:
    """name -> size of every object of a bucket, through the gateway's listing."""
    out: dict[str, int] = {}
    token = ""
    while True:
        q = urllib.parse.urlencode({"page_size": "5000", "continuation_token": token})
        status, body, _ = http("GET", f"{c.endpoint}/v1/buckets/{bucket}?{q}")
        assert status == 200, body
        page = json.loads(body)
        for e in page["entries"]:
            assert e["name"] not in out, f"listed twice: {e['name']}"
            out[e["name"]] = e["size"]
        token = page["continuation_token"]
        if not token:
            return out


def get_all(c: LocalCluster, bucket: str, names: list[str], concurrency: int = 32
            ) -> dict[str, bytes]:
    """Read objects through the gateway (307 to the owner): proves placement by HRW."""
    async def main() -> dict[str, bytes]:
        sem = asyncio.Semaphore(concurrency)
        out: dict[str, bytes] = {}
        async with aiohttp.ClientSession() as s:
            async def one(name: str) -> None:
                url = f"{c.endpoint}/v1/objects/{bucket}/{urllib.parse.quote(name)}"
                async with sem, s.get(url) as r:
                    assert r.status == 200, (name, r.status, await r.text())
                    out[name] = await r.read()

            await asyncio.gather(*(one(n) for n in names))
        return out

    return asyncio.run(main())


def start_job(c: LocalCluster, src: str, msg: dict[str, Any], query: str = ""
              ) -> tuple[int, str]:
    status, body, _ = http("POST", f"{c.endpoint}/v1/buckets/{src}{query}",
                           json.dumps(msg).encode(), {"Content-Type": "application/json"},
                           timeout=60)
    return status, body.decode()


def job_status(c: LocalCluster, xid: str) -> dict[str, Any]:
    status, body, _ = http("GET", f"{c.endpoint}/v1/xactions/{xid}", timeout=30)
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def wait_job(c: LocalCluster, xid: str, timeout: float = 90) -> dict[str, Any]:
    st: dict[str, Any] = wait_until(lambda: (s := job_status(c, xid))["finished"] and s,
                                    timeout, f"xaction {xid} to finish", interval=0.2)
    return st


def wait_progress(c: LocalCluster, xid: str, at_least: int, timeout: float = 60
                  ) -> dict[str, Any]:
    st: dict[str, Any] = wait_until(
        lambda: (s := job_status(c, xid))["objects"] >= at_least and s,
        timeout, f"xaction {xid} to do {at_least} objects", interval=0.05)
    return st


def tmp_files(c: LocalCluster) -> list[str]:
    """Uploads in flight on every target (should be none once a job ended)."""
    out = []
    for t in c.smap():
        out += [p.name for p in (c.target_data(t["id"]) / "tmp").iterdir()]
    return out


def settle(seconds: float = 0.3) -> None:
    time.sleep(seconds)
