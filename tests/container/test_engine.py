"""The container engine adapter against a real engine and real containers.

Needs podman (hack/container-setup.sh) and the images
localhost/aisetl-python3:bookworm (same script) and quay.io/user/md5_server:v1
(hack/build-seed-image.sh). Every container started here carries a label unique
to its test and is removed by that test, whatever happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from aisetl.orchestrator.engine import (
    ContainerEngine,
    ContainerEngineError,
    ContainerNotFoundError,
    ImageNotFoundError,
    detect_engine,
)
from tests.support.prereq import require

pytestmark = pytest.mark.container

BASE_IMAGE = "localhost/aisetl-python3:bookworm"
MD5_IMAGE = "quay.io/user/md5_server:v1"
# The seed's spec.yaml, verbatim: image, containerPort and command.
SEED_COMMAND = ["/code/server.py", "--listen", "0.0.0.0", "--port", "80"]
TEST_LABEL = "aisetl.io/test"
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Containers:
    """Starts containers with this test's label; removes them all at teardown."""

    def __init__(self, engine: ContainerEngine) -> None:
        self.engine = engine
        self.tag = uuid.uuid4().hex[:12]
        self.labels = {TEST_LABEL: self.tag}
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return f"aisetl-test-{self.tag}-{self._n}"

    async def run(
        self,
        image: str,
        *,
        command: list[str] | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        container_port: int = 80,
        name: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[str, int]:
        host_port = free_port()
        cid = await self.engine.run(
            name=name or self.name(),
            image=image,
            command=command,
            args=args,
            env=env or {},
            host_port=host_port,
            container_port=container_port,
            labels={**self.labels, **(labels or {})},
        )
        return cid, host_port


@pytest.fixture
async def engine() -> ContainerEngine:
    found = await detect_engine()
    require(
        found is not None,
        "a container engine (podman or docker)",
        "bash hack/container-setup.sh",
    )
    assert found is not None
    return found


@pytest.fixture
async def containers(engine: ContainerEngine) -> AsyncIterator[Containers]:
    c = Containers(engine)
    try:
        yield c
    finally:
        await engine.remove_labelled(TEST_LABEL, c.tag)


@pytest.fixture
async def md5_image(engine: ContainerEngine) -> str:
    require(
        await engine.image_exists(MD5_IMAGE),
        f"image {MD5_IMAGE}",
        "bash hack/container-setup.sh && bash hack/build-seed-image.sh",
    )
    return MD5_IMAGE


@pytest.fixture
async def base_image(engine: ContainerEngine) -> str:
    require(
        await engine.image_exists(BASE_IMAGE), f"image {BASE_IMAGE}", "bash hack/container-setup.sh"
    )
    return BASE_IMAGE


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def post_until_ready(
    http: aiohttp.ClientSession, port: int, body: bytes, within: float = READY_TIMEOUT
) -> str:
    """POST until the server answers 200; return the answer."""
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with http.post(f"http://127.0.0.1:{port}/", data=body) as r:
                if r.status == 200:
                    return await r.text()
                last = AssertionError(f"status {r.status}")
        except (TimeoutError, aiohttp.ClientError) as e:
            last = e
        await asyncio.sleep(0.05)
    raise AssertionError(f"not ready on 127.0.0.1:{port} within {within} s: {last!r}")


async def wait_exited(engine: ContainerEngine, cid: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        info = await engine.exit_info(cid)
        if info is not None and info.exit_code is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"container {cid} did not exit within {within} s")


async def test_md5_image_answers_post(
    engine: ContainerEngine,
    containers: Containers,
    md5_image: str,
    http: aiohttp.ClientSession,
    record_property: pytest.RecordProperty,
) -> None:
    body = b"some text :)\n"
    started = time.monotonic()
    cid, port = await containers.run(md5_image, command=SEED_COMMAND, container_port=80)
    answer = await post_until_ready(http, port, body)
    latency = time.monotonic() - started
    record_property("start_to_ready_s", round(latency, 3))
    print(f"start-to-ready {latency:.3f} s")
    assert answer == hashlib.md5(body).hexdigest() == "393c6706efb128fbc442d3f7d084a426"
    assert await engine.is_running(cid)
    info = await engine.exit_info(cid)
    assert info is not None and info.running and info.exit_code is None
    # The seed's server logs one line per request to stderr.
    assert "POST / HTTP/1.1" in await engine.logs(cid)


async def test_image_entrypoint_and_args_have_kubernetes_semantics(
    containers: Containers, md5_image: str, http: aiohttp.ClientSession
) -> None:
    # No command: the image's ENTRYPOINT (port 80).
    _, port = await containers.run(md5_image)
    assert await post_until_ready(http, port, b"a") == hashlib.md5(b"a").hexdigest()
    # args only: appended to the ENTRYPOINT, the last --port wins (8080).
    _, port = await containers.run(md5_image, args=["--port", "8080"], container_port=8080)
    assert await post_until_ready(http, port, b"b") == hashlib.md5(b"b").hexdigest()
    # command + args: command replaces the ENTRYPOINT, args follow it.
    _, port = await containers.run(
        md5_image,
        command=["python", "/code/server.py"],
        args=["--listen", "0.0.0.0", "--port", "9090"],
        container_port=9090,
    )
    assert await post_until_ready(http, port, b"c") == hashlib.md5(b"c").hexdigest()


async def test_exit_code_env_and_logs_of_a_crashed_container(
    engine: ContainerEngine, containers: Containers, base_image: str
) -> None:
    env = {"AISETL_TOKEN": "s3cret value=with spaces", "MULTI": "line1\nline2"}
    cid, _ = await containers.run(
        base_image,
        command=["sh", "-c", 'echo "token=$AISETL_TOKEN"; echo "$MULTI"; echo boom >&2; exit 7'],
        env=env,
    )
    await wait_exited(engine, cid)
    info = await engine.exit_info(cid)
    assert info is not None
    assert info.exit_code == 7 and not info.running and info.status in ("exited", "stopped")
    assert not await engine.is_running(cid)
    logs = await engine.logs(cid)
    assert "token=s3cret value=with spaces" in logs
    assert "line1\nline2" in logs
    assert "boom" in logs
    assert (await engine.logs(cid, tail=1)).strip().splitlines() == ["boom"]


async def test_remove(engine: ContainerEngine, containers: Containers, md5_image: str) -> None:
    cid, _ = await containers.run(md5_image)
    assert await engine.is_running(cid)
    started = time.monotonic()
    await engine.remove(cid)
    assert time.monotonic() - started < 10, "remove must not wait for a graceful stop"
    assert not await engine.is_running(cid)
    assert await engine.exit_info(cid) is None
    with pytest.raises(ContainerNotFoundError):
        await engine.logs(cid)
    await engine.remove(cid)  # already gone: fine
    assert await engine.list_labelled(TEST_LABEL, containers.tag) == []


async def test_remove_labelled(
    engine: ContainerEngine, containers: Containers, base_image: str
) -> None:
    stale = {"aisetl.io/target": f"t-{containers.tag}"}
    ids = set()
    for _ in range(2):
        cid, _ = await containers.run(base_image, command=["sleep", "300"], labels=stale)
        ids.add(cid)
    other, _ = await containers.run(base_image, command=["sleep", "300"])
    [(key, value)] = stale.items()
    assert set(await engine.list_labelled(key, value)) == ids
    assert set(await engine.remove_labelled(key, value)) == ids
    assert await engine.list_labelled(key, value) == []
    for cid in ids:
        assert await engine.exit_info(cid) is None
    assert await engine.is_running(other), "a container without the label stays"
    assert await engine.remove_labelled(key, value) == []


async def test_container_reaches_host_loopback(
    engine: ContainerEngine, containers: Containers, base_image: str
) -> None:
    secret = uuid.uuid4().hex
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text=f"hello {secret}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        url = f"http://{engine.host_loopback_address}:{port}/bck/obj"
        cid, _ = await containers.run(
            base_image,
            command=["python", "-c"],
            args=[
                "import os, urllib.request; "
                "print(urllib.request.urlopen(os.environ['AIS_TARGET_URL'], timeout=10)"
                ".read().decode())"
            ],
            env={"AIS_TARGET_URL": url},
        )
        await wait_exited(engine, cid)
        info = await engine.exit_info(cid)
        logs = await engine.logs(cid)
        assert info is not None and info.exit_code == 0, logs
        assert f"hello {secret}" in logs
        assert seen == ["/bck/obj"]
    finally:
        await runner.cleanup()


async def test_missing_image_fails_fast_naming_it(
    engine: ContainerEngine, containers: Containers
) -> None:
    image = f"localhost/aisetl-no-such-image-{containers.tag}:v0"
    name = containers.name()
    started = time.monotonic()
    with pytest.raises(ImageNotFoundError) as e:
        await containers.run(image, name=name)
    assert time.monotonic() - started < 10
    assert e.value.image == image
    assert image in str(e.value)
    assert isinstance(e.value, ContainerEngineError)
    assert await engine.exit_info(name) is None, "no container is left behind"


async def test_name_in_use_is_an_engine_error(
    engine: ContainerEngine, containers: Containers, base_image: str
) -> None:
    name = containers.name()
    await containers.run(base_image, command=["sleep", "300"], name=name)
    with pytest.raises(ContainerEngineError) as e:
        await containers.run(base_image, command=["sleep", "300"], name=name)
    assert not isinstance(e.value, ImageNotFoundError)
    assert e.value.stderr, "the engine's stderr is carried"
    assert await engine.is_running(name), "the first container is untouched"


async def test_failed_start_frees_the_name(
    engine: ContainerEngine, containers: Containers, base_image: str
) -> None:
    """A start that fails in the runtime must not leave a 'created' container."""
    name = containers.name()
    with pytest.raises(ContainerEngineError) as e:
        await containers.run(base_image, command=["/no/such/binary"], name=name)
    assert not isinstance(e.value, ImageNotFoundError)
    assert await engine.exit_info(name) is None
    cid, _ = await containers.run(base_image, command=["sleep", "300"], name=name)
    assert await engine.is_running(cid)


async def test_an_engine_that_does_not_work_is_not_detected() -> None:
    with pytest.raises(ContainerEngineError):
        await ContainerEngine("podman", binary="/nonexistent/podman").probe()
    with pytest.raises(ValueError):
        await detect_engine("lxc")
