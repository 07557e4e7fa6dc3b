"""What only the python3 runtime does: several serving workers and transform_stream."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct

import aiohttp
import pytest
from yarl import URL

from .conftest import FakeTarget, Launch

IDENTITY_STREAM = """
async def transform_stream(chunks):
    async for chunk in chunks:
        yield chunk
"""

UPPER_STREAM = """
def transform(input_bytes):  # ignored: transform_stream wins
    return b"wrong"


async def transform_stream(chunks):
    async for chunk in chunks:
        if chunk.startswith(b"fail-first"):
            raise RuntimeError("refused before any output")
        yield chunk.upper()
        if b"fail-later" in chunk:
            raise RuntimeError("broke mid-stream")
"""


async def test_a_burst_of_keepalive_connections_is_spread_over_the_workers(
    launch: Launch,
) -> None:
    # A target opens its connection pool in a burst and then keeps the
    # connections: they must not all land on one worker.
    server = await launch("python3", workers=2)
    worker_pids = {p.pid for p in server.workers()}
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.put(server.url + "/", data=b"pid-slow") as resp:
                assert resp.status == 200
                return int(await resp.text())

        served_by = set(await asyncio.gather(*(one() for _ in range(32))))
    assert len(served_by) == 2, served_by
    assert served_by <= worker_pids


async def test_workers_default_to_the_aisetl_workers_env(launch: Launch) -> None:
    server = await launch("python3", workers=None, env={"AISETL_WORKERS": "3"})
    assert len(server.workers()) == 3


@pytest.mark.slow
async def test_transform_stream_moves_256_mib_with_bounded_server_memory(
    launch: Launch,
) -> None:
    server = await launch("python3", IDENTITY_STREAM, workers=2)
    tree = server.tree()
    chunk = os.urandom(1 << 20)
    total = 256 << 20

    def rss() -> int:
        return sum(p.memory_info().rss for p in tree)

    baseline = rss()
    peak = baseline
    sent = hashlib.md5()
    received = hashlib.md5()
    received_len = 0

    async def body():
        for i in range(total // len(chunk)):
            piece = i.to_bytes(4, "big") + chunk[4:]
            sent.update(piece)
            yield piece

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss())
            await asyncio.sleep(0.02)  # sampling period, not synchronisation

    sampler = asyncio.create_task(sample())
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.put(server.url + "/", data=body()) as resp,
        ):
            assert resp.status == 200
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            async for piece in resp.content.iter_chunked(1 << 20):
                received.update(piece)
                received_len += len(piece)
    finally:
        sampler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sampler
    assert received_len == total
    assert received.hexdigest() == sent.hexdigest()
    growth = peak - baseline
    print(f"server RSS: baseline {baseline >> 20} MiB, peak {peak >> 20} MiB")
    assert growth < 64 << 20, f"server RSS grew by {growth >> 20} MiB for a 256 MiB stream"


async def test_transform_stream_serves_hrev_from_the_target(
    launch: Launch, fake_target: FakeTarget
) -> None:
    fake_target.objects[("bkt", "big/one")] = b"abc" * (3 << 20)
    server = await launch("python3", UPPER_STREAM, target_url=fake_target.url)
    async with aiohttp.ClientSession() as session:
        async with session.get(URL(server.url + "/bkt/big/one")) as resp:
            assert resp.status == 200
            assert await resp.read() == b"ABC" * (3 << 20)
        async with session.get(server.url + "/bkt/missing") as resp:
            assert resp.status == 404
            assert await resp.text() == "object bkt/missing does not exist"


async def test_transform_stream_failing_before_output_is_a_500(launch: Launch) -> None:
    server = await launch("python3", UPPER_STREAM)
    async with aiohttp.ClientSession() as session:
        async with session.put(server.url + "/", data=b"fail-first") as resp:
            assert resp.status == 500
            assert await resp.text() == "RuntimeError: refused before any output"
        async with session.put(server.url + "/", data=b"fine") as resp:
            assert resp.status == 200
            assert await resp.read() == b"FINE"


async def test_transform_stream_failing_mid_stream_truncates_the_response(
    launch: Launch,
) -> None:
    server = await launch("python3", UPPER_STREAM)
    async with aiohttp.ClientSession() as session:
        async with session.put(server.url + "/", data=b"fail-later") as resp:
            assert resp.status == 200  # the status line was already sent
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with session.put(server.url + "/", data=b"fine") as resp:
            assert await resp.read() == b"FINE"
    assert "RuntimeError: broke mid-stream" in server.stderr()


async def test_port_in_use_exits_1_even_if_held_by_another_runtime(launch: Launch) -> None:
    # SO_REUSEPORT would let a second server share the port with a stale one.
    first = await launch("python3", workers=1)
    second = await launch("python3", workers=1, port=first.port, wait=False)
    assert await second.wait_exit() == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr()
    assert first.proc.poll() is None


# --- POST /batch (offline jobs): many small objects per request -----------------------------
BATCH_REQ = struct.Struct(">HQ")
BATCH_RESP = struct.Struct(">BQ")


def batch_body(items: list[tuple[str, bytes]]) -> bytes:
    return b"".join(BATCH_REQ.pack(len(n.encode()), len(d)) + n.encode() + d for n, d in items)


def parse_reply(body: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(body):
        status, n = BATCH_RESP.unpack_from(body, i)
        i += BATCH_RESP.size
        out.append((status, body[i:i + n]))
        i += n
    assert i == len(body), "the reply ends with a whole frame"
    return out


async def test_health_advertises_batch_only_for_a_plain_transform(launch: Launch) -> None:
    plain = await launch("python3")
    stream = await launch("python3", IDENTITY_STREAM)
    async with aiohttp.ClientSession() as session:
        async with session.get(plain.url + "/health") as resp:
            assert resp.headers.get("X-Aisetl-Batch") == "1"
        async with session.get(stream.url + "/health") as resp:
            assert resp.status == 200 and "X-Aisetl-Batch" not in resp.headers
        # a streaming transform keeps its contract: no batch endpoint at all
        async with session.post(stream.url + "/batch", data=batch_body([("b/x", b"x")])) as r:
            assert r.status == 404


async def test_batch_answers_every_object_in_order_and_failures_per_object(
        launch: Launch) -> None:
    server = await launch("python3")
    big = os.urandom(3 << 20)
    items = [("b/a", b"some text :)\n"), ("b/bad", b"raise:boom"), ("b/empty", b""),
             ("b/big", big), *((f"b/o{i}", b"%d" % i) for i in range(200))]
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/batch",
                                data=io.BytesIO(batch_body(items))) as resp:
            assert resp.status == 200
            frames = parse_reply(await resp.read())
        # the server goes on serving after a failed object
        async with session.put(server.url + "/", data=b"abc") as resp:
            assert await resp.text() == hashlib.md5(b"abc").hexdigest()
    expected = [(0, hashlib.md5(d).hexdigest().encode()) for _, d in items]
    expected[1] = (1, b"ValueError: bad input: boom")
    assert frames == expected
    assert "ValueError: bad input: boom" in server.stderr()


@pytest.mark.parametrize(("body", "why"), [
    (b"\x00", "body ends inside a frame header"),
    (BATCH_REQ.pack(0, 3) + b"abc", "name length 0"),
    (BATCH_REQ.pack(3, 17 << 20) + b"b/x", "is above"),  # refused before any read of it
    (BATCH_REQ.pack(3, 10) + b"b/x" + b"short", "body ends inside the frame"),
])
async def test_a_malformed_first_frame_is_a_400(launch: Launch, body: bytes, why: str) -> None:
    server = await launch("python3")
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/batch", data=body) as resp:
            assert resp.status == 400
            assert why in await resp.text()


async def test_a_batch_broken_after_its_first_frame_ends_with_a_broken_frame(
        launch: Launch) -> None:
    server = await launch("python3")
    body = batch_body([("b/a", b"abc")]) + BATCH_REQ.pack(0, 1)
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/batch", data=body) as resp:
            assert resp.status == 200  # the first answer was already on its way
            frames = parse_reply(await resp.read())
    assert frames[0] == (0, hashlib.md5(b"abc").hexdigest().encode())
    assert frames[1][0] == 2 and b"name length 0" in frames[1][1]
    assert len(frames) == 2
