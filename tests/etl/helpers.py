"""Small helpers for ETL tests against a real cluster."""

from __future__ import annotations

import json
import subprocess
import urllib.parse

from tests.support.cluster import LocalCluster, http

MD5_CODE = """\
import hashlib

def transform(input_bytes):
    md5 = hashlib.md5()
    md5.update(input_bytes)
    return md5.hexdigest().encode()
"""

IDENTITY_STREAM_CODE = """\
async def transform_stream(chunks):
    async for chunk in chunks:
        yield chunk
"""


def sh(cmd: str, env: dict[str, str], cwd: object = None, timeout: float = 180
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def build(c: LocalCluster, code: str, runtime: str = "python3", **extra: object
          ) -> tuple[int, str]:
    body = json.dumps({"code": code, "runtime": runtime, **extra}).encode()
    status, out, _ = http("POST", c.endpoint + "/v1/etl/build", body,
                          {"Content-Type": "application/json"}, timeout=300)
    return status, out.decode()


def stop(c: LocalCluster, etl_id: str) -> None:
    status, body, _ = http("DELETE", f"{c.endpoint}/v1/etl/stop/{etl_id}")
    assert status == 200, body


def ensure_bucket(c: LocalCluster, name: str) -> None:
    status, body, _ = http("POST", f"{c.endpoint}/v1/buckets/{name}",
                           b'{"action": "create-bck"}')
    assert status in (200, 409), body


def put(c: LocalCluster, bucket: str, obj: str, data: bytes) -> None:
    ensure_bucket(c, bucket)
    _, _, hdrs = http("PUT", f"{c.endpoint}/v1/objects/{bucket}/{urllib.parse.quote(obj)}")
    status, body, _ = http("PUT", hdrs["Location"], data)
    assert status == 200, body


def transform_get(c: LocalCluster, bucket: str, obj: str, etl_id: str,
                  timeout: float = 120) -> tuple[int, bytes]:
    """GET ?uuid= following redirects (gateway -> target -> transformer for hpull)."""
    url = f"{c.endpoint}/v1/objects/{bucket}/{urllib.parse.quote(obj)}?uuid={etl_id}"
    for _ in range(4):
        status, body, hdrs = http("GET", url, timeout=timeout)
        if status != 307:
            return status, body
        url = hdrs["Location"]
    raise AssertionError("redirect loop")


def etl_status(c: LocalCluster, etl_id: str) -> dict[str, object]:
    status, body, _ = http("GET", f"{c.endpoint}/v1/etl/{etl_id}")
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]
