"""Objects through a real 3-target cluster: placement, concurrency, big bodies, bad input."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from tests.support.cluster import LocalCluster, http, wait_until
from tests.support.memory import RssSampler


def make_bucket(c: LocalCluster, name: str) -> None:
    status, body, _ = http("POST", f"{c.endpoint}/v1/buckets/{name}",
                           b'{"action": "create-bck"}', {"Content-Type": "application/json"})
    assert status == 200, body


def put(c: LocalCluster, bucket: str, obj: str, data: bytes) -> None:
    status, _, hdrs = http("PUT", f"{c.endpoint}/v1/objects/{bucket}/{obj}")
    assert status == 307, status
    status, body, _ = http("PUT", hdrs["Location"], data)
    assert status == 200, body


def get(c: LocalCluster, bucket: str, obj: str) -> tuple[int, bytes]:
    status, body, hdrs = http("GET", f"{c.endpoint}/v1/objects/{bucket}/{obj}")
    if status != 307:
        return status, body
    status, body, _ = http("GET", hdrs["Location"])
    return status, body


def test_objects_land_on_every_target(cluster: LocalCluster) -> None:
    make_bucket(cluster, "spread")
    for i in range(60):
        put(cluster, "spread", f"o/{i}", f"data-{i}".encode())
    for t in cluster.smap():
        files = list((cluster.target_data(t["id"]) / "buckets" / "spread").rglob("*"))
        assert any(f.is_file() for f in files), f"target {t['id']} got no objects"
    assert get(cluster, "spread", "o/7") == (200, b"data-7")


def test_gateway_redirects_and_never_reads_the_body(cluster: LocalCluster) -> None:
    make_bucket(cluster, "redir")
    status, _, hdrs = http("PUT", f"{cluster.endpoint}/v1/objects/redir/a?x=1")
    assert status == 307
    loc = urllib.parse.urlsplit(hdrs["Location"])
    assert loc.path == "/v1/objects/redir/a" and loc.query == "x=1"
    assert loc.port in {urllib.parse.urlsplit(t["url"]).port for t in cluster.smap()}


async def test_200_concurrent_puts_and_gets_return_what_was_stored(
        cluster: LocalCluster) -> None:
    make_bucket(cluster, "conc")
    payloads = {f"obj-{i:03d}": os.urandom(1000 + i * 97) for i in range(200)}
    async with aiohttp.ClientSession() as s:
        async def one_put(name: str, data: bytes) -> None:
            async with s.put(f"{cluster.endpoint}/v1/objects/conc/{name}",
                             allow_redirects=False) as r:
                assert r.status == 307
                loc = r.headers["Location"]
            async with s.put(loc, data=data) as r:
                assert r.status == 200, await r.text()

        async def one_get(name: str) -> bytes:
            async with s.get(f"{cluster.endpoint}/v1/objects/conc/{name}") as r:
                assert r.status == 200
                return await r.read()

        await asyncio.gather(*(one_put(n, d) for n, d in payloads.items()))
        got = await asyncio.gather(*(one_get(n) for n in payloads))
    assert dict(zip(payloads, got, strict=True)) == payloads


def test_list_objects_merges_targets_in_order_with_pages(cluster: LocalCluster) -> None:
    make_bucket(cluster, "listing")
    names = sorted(f"d{i % 3}/n{i:02d}" for i in range(25))
    for n in names:
        put(cluster, "listing", n, b"x")
    import json

    seen: list[str] = []
    token = ""
    for _ in range(10):
        q = f"page_size=7&continuation_token={urllib.parse.quote(token)}"
        status, body, _ = http("GET", f"{cluster.endpoint}/v1/buckets/listing?{q}")
        assert status == 200
        page = json.loads(body)
        seen += [e["name"] for e in page["entries"]]
        token = page["continuation_token"]
        if not token:
            break
    assert seen == names
    status, body, _ = http("GET", f"{cluster.endpoint}/v1/buckets/listing?prefix=d1/")
    assert [e["name"] for e in json.loads(body)["entries"]] == [n for n in names
                                                                if n.startswith("d1/")]


@pytest.mark.parametrize("path,expect", [
    ("/v1/objects/bad%20bucket/x", 400),
    ("/v1/objects/b..b/x", 200),
    ("/v1/objects/ok/a%2F..%2F..%2Fescape", 400),
    ("/v1/objects/ok/a//b", 400),
    ("/v1/objects/ok/%00nul", 400),
    ("/v1/objects/ok/" + "x" * 300, 400),
])
def test_bad_names_are_refused_with_a_400(cluster: LocalCluster, path: str,
                                          expect: int) -> None:
    if expect == 200:
        make_bucket(cluster, "b..b")
        status, _, _ = http("PUT", cluster.endpoint + path)
        assert status == 307
        return
    status, body, _ = http("PUT", cluster.endpoint + path)
    assert status == expect, body
    assert b'"message"' in body
    assert not list(cluster.state.rglob("escape"))


def test_put_to_missing_bucket_is_404_with_the_fix(cluster: LocalCluster) -> None:
    status, body, _ = http("PUT", f"{cluster.endpoint}/v1/objects/nosuch/x", b"abc")
    assert status == 404
    assert b"ais create bucket nosuch" in body


def test_unknown_bucket_action_names_the_valid_ones(cluster: LocalCluster) -> None:
    status, body, _ = http("POST", f"{cluster.endpoint}/v1/buckets/x", b'{"action": "nope"}')
    assert status == 400 and b"create-bck" in body


def test_upload_cut_off_midway_leaves_no_object(cluster: LocalCluster) -> None:
    make_bucket(cluster, "cut")
    _, _, hdrs = http("PUT", f"{cluster.endpoint}/v1/objects/cut/partial")
    loc = urllib.parse.urlsplit(hdrs["Location"])
    tid = next(t["id"] for t in cluster.smap() if urllib.parse.urlsplit(t["url"]).port == loc.port)
    with socket.create_connection((loc.hostname, loc.port)) as s:
        s.sendall(f"PUT {loc.path} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n"
                  .encode() + b"z" * 3_000_000)
        wait_until(lambda: any((cluster.target_data(tid) / "tmp").iterdir()), 10,
                   "the upload to start")
    tmp = cluster.target_data(tid) / "tmp"
    wait_until(lambda: not any(tmp.iterdir()), 10, "temp file removal")
    assert get(cluster, "cut", "partial")[0] == 404


def test_metrics_are_served_by_every_process(cluster: LocalCluster) -> None:
    status, body, _ = http("GET", cluster.endpoint + "/metrics")
    assert status == 200 and b'aisetl_http_requests_total{' in body
    for t in cluster.smap():
        status, body, _ = http("GET", t["url"] + "/metrics")
        assert status == 200 and b"aisetl_object_requests_total" in body


@pytest.mark.slow
def test_1gib_object_streams_through_curl_with_flat_memory(cluster: LocalCluster,
                                                           tmp_path: Path) -> None:
    make_bucket(cluster, "big")
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    md5 = hashlib.md5()
    with open(src, "wb") as f:
        for i in range(1024):
            chunk = block[i:] + block[:i]
            f.write(chunk)
            md5.update(chunk)
    procs = {"gateway": cluster.role_process("gateway")}
    procs.update({t["id"]: cluster.role_process(t["id"]) for t in cluster.smap()})
    url = f"{cluster.endpoint}/v1/objects/big/one-gib.bin"
    with RssSampler(procs) as put_mem:
        t0 = time.monotonic()
        subprocess.run(["curl", "-sSf", "-L", "-X", "PUT", "-T", str(src), url], check=True)
        put_s = time.monotonic() - t0
    src.unlink()
    got = hashlib.md5()
    with RssSampler(procs) as get_mem:
        t0 = time.monotonic()
        with subprocess.Popen(["curl", "-sSf", "-L", url], stdout=subprocess.PIPE) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read(1 << 20):
                got.update(chunk)
        get_s = time.monotonic() - t0
    assert p.returncode == 0
    assert got.hexdigest() == md5.hexdigest()
    print(f"\n1 GiB PUT {1024 / put_s:.0f} MiB/s, GET {1024 / get_s:.0f} MiB/s; "
          f"RSS growth PUT {put_mem.growth_mib()} GET {get_mem.growth_mib()}")
    for name, grown in {**put_mem.growth_mib(), **get_mem.growth_mib()}.items():
        assert grown < 64, f"{name} grew {grown:.0f} MiB while 1 GiB streamed"
