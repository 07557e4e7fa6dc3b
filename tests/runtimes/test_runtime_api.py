"""The HTTP contract every build runtime honours (runtimes/README.md), for each runtime."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from yarl import URL

from tests.runtimes.conftest import PYTHON27

from .conftest import FakeTarget, Launch, free_port, md5

# "python2.7" (the python2 runtime under a real Python 2.7) is extra coverage,
# collected only where such an interpreter exists: never a skip standing in for a pass.
pytestmark = pytest.mark.parametrize(
    "runtime", ["python3", "python2"] + (["python2.7"] if PYTHON27 else []))

SEED_MD5 = "393c6706efb128fbc442d3f7d084a426"  # echo "some text :)" | md5sum


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_hpush_replies_with_the_transformed_body(
    runtime: str, method: str, launch: Launch
) -> None:
    server = await launch(runtime)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + "/", data=b"some text :)\n") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-Length"] == str(len(SEED_MD5))
        assert await resp.text() == SEED_MD5


async def test_hpush_reads_a_chunked_request_body(runtime: str, launch: Launch) -> None:
    server = await launch(runtime)

    async def body():  # no Content-Length: aiohttp sends it chunked
        for piece in (b"some ", b"text", b" :)\n"):
            yield piece

    async with (
        aiohttp.ClientSession() as session,
        session.put(server.url + "/", data=body()) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == SEED_MD5


async def test_get_reads_the_object_through_ais_target_url(
    runtime: str, launch: Launch, fake_target: FakeTarget
) -> None:
    server = await launch(runtime, target_url=fake_target.url)
    url = URL(server.url + "/bkt/dir/sub/a%20b%25.txt", encoded=True)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.text() == md5(fake_target.objects[("bkt", "dir/sub/a b%.txt")])
    assert fake_target.raw_paths == ["/v1/etl/objects/s3cr3t/bkt/dir/sub/a%20b%25.txt"]


async def test_get_passes_on_the_targets_error_status_and_text(
    runtime: str, launch: Launch, fake_target: FakeTarget
) -> None:
    server = await launch(runtime, target_url=fake_target.url)
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/bkt/no/such/object") as resp,
    ):
        assert resp.status == 404
        assert await resp.text() == "object bkt/no/such/object does not exist"


async def test_get_answers_502_when_the_target_is_unreachable(runtime: str, launch: Launch) -> None:
    server = await launch(runtime, target_url=f"http://127.0.0.1:{free_port()}/v1/x")
    async with aiohttp.ClientSession() as session, session.get(server.url + "/b/o") as resp:
        assert resp.status == 502
        assert "connect" in (await resp.text()).lower()


async def test_health_answers_ok(runtime: str, launch: Launch) -> None:
    server = await launch(runtime)
    async with aiohttp.ClientSession() as session, session.get(server.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"
        # only the python3 runtime serves POST /batch (offline jobs); it says so here,
        # and a target batches only when it reads this
        assert resp.headers.get("X-Aisetl-Batch") == ("1" if runtime == "python3" else None)


async def test_raising_transform_is_a_500_with_its_message_and_serving_goes_on(
    runtime: str, launch: Launch
) -> None:
    server = await launch(runtime)
    async with aiohttp.ClientSession() as session:
        async with session.put(server.url + "/", data=b"raise:boom") as resp:
            assert resp.status == 500
            assert await resp.text() == "ValueError: bad input: boom"
        async with session.put(server.url + "/", data=b"some text :)\n") as resp:
            assert resp.status == 200
            assert await resp.text() == SEED_MD5
    stderr = server.stderr()
    assert "Traceback" in stderr
    assert "ValueError: bad input: boom" in stderr


async def test_transform_returning_text_instead_of_bytes_is_a_500(
    runtime: str, launch: Launch
) -> None:
    server = await launch(runtime, "def transform(b):\n    return u'text'\n")
    async with aiohttp.ClientSession() as session, session.put(server.url + "/", data=b"x") as r:
        assert r.status == 500
        text_type = "unicode" if runtime == "python2.7" else "str"
        assert await r.text() == f"TypeError: transform must return bytes, not {text_type}"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("def transform(b)\n    return b\n", "SyntaxError"),
        ("import no_such_module_for_aisetl\n", "No module named"),
        ("def transfrom(b):\n    return b\n", "defines neither transform"),
    ],
    ids=["syntax-error", "import-error", "missing-transform"],
)
async def test_unusable_module_exits_1_with_the_reason_before_listening(
    runtime: str, code: str, reason: str, launch: Launch
) -> None:
    if runtime.startswith("python2") and reason.startswith("defines"):
        reason = "does not define transform"
    server = await launch(runtime, code, wait=False)
    assert await server.wait_exit() == 1
    stderr = server.stderr()
    assert reason in stderr
    if reason == "No module named":
        assert "no_such_module_for_aisetl" in stderr
    assert "cannot load user code" in stderr.strip().splitlines()[-1]
    assert "serving" not in stderr


async def test_32_concurrent_requests_are_all_answered_correctly(
    runtime: str, launch: Launch
) -> None:
    server = await launch(runtime)
    bodies = [os.urandom(1000 + i * 4099) for i in range(32)]
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes) -> str:
            async with session.put(server.url + "/", data=body) as resp:
                assert resp.status == 200
                return await resp.text()

        answers = await asyncio.gather(*(one(b) for b in bodies))
    assert answers == [md5(b) for b in bodies]


async def test_sigterm_stops_every_process_promptly_with_exit_0(
    runtime: str, launch: Launch
) -> None:
    server = await launch(runtime, workers=2)
    tree = server.tree()
    assert len(tree) == 3, tree  # the parent and two workers
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert await server.wait_exit(within=5) == 0
    assert time.monotonic() - started < 2.0
    _, alive = psutil.wait_procs(tree, timeout=0.5)
    assert alive == []


async def test_sigterm_during_a_hung_transform_still_stops_promptly(
    runtime: str, launch: Launch, tmp_path: Path
) -> None:
    mark = tmp_path / "transform-started"
    code = (
        "import time\n"
        "def transform(b):\n"
        f"    open({str(mark)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "    return b\n"
    )
    server = await launch(runtime, code, workers=1)
    tree = server.tree()
    async with aiohttp.ClientSession() as session:

        async def hang() -> None:
            async with session.put(server.url + "/", data=b"x") as resp:
                await resp.read()

        hanging = asyncio.create_task(hang())
        deadline = time.monotonic() + 10
        while not mark.exists():
            assert time.monotonic() < deadline, "the transform never started"
            await asyncio.sleep(0.02)  # poll interval, bounded by the deadline
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait_exit(within=5) == 0
        assert time.monotonic() - started < 2.0
        with pytest.raises(aiohttp.ClientError):
            await hanging
    _, alive = psutil.wait_procs(tree, timeout=0.5)
    assert alive == []


async def test_killed_parent_leaves_no_orphan_workers(runtime: str, launch: Launch) -> None:
    server = await launch(runtime, workers=2)
    workers = server.workers()
    assert len(workers) == 2
    server.proc.kill()
    await server.wait_exit()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []


async def test_dead_worker_is_replaced_and_serving_goes_on(runtime: str, launch: Launch) -> None:
    server = await launch(runtime, workers=2)
    first, second = server.workers()
    first.kill()
    deadline = time.monotonic() + 10
    while True:
        pids = server.live_worker_pids()
        if len(pids) == 2 and first.pid not in pids:
            break
        assert time.monotonic() < deadline, f"worker not replaced: {pids}"
        await asyncio.sleep(0.05)  # poll interval, bounded by the deadline
    assert second.pid in pids
    await server.wait_healthy()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(8):
            async with session.put(server.url + "/", data=b"some text :)\n") as resp:
                assert resp.status == 200
                assert await resp.text() == SEED_MD5
