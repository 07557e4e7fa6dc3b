"""hpush against a real HTTP transformer while the object is replaced underneath."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from aisetl.etl.communicators import open_transform
from aisetl.orchestrator.base import Transformer
from aisetl.storage.objects import ObjectMeta, ObjectStore


class EchoTransformer(Transformer):
    def __init__(self, url: str) -> None:
        self.etl_id = "echo"
        self.endpoint = self.public_endpoint = url

    async def wait_ready(self, timeout: float) -> None: ...
    async def wait_exit(self) -> str:
        return ""
    async def logs(self, tail: int = 50) -> str:
        return ""
    async def stop(self) -> None: ...


class ReplacedAfterHead(ObjectStore):
    """A PUT lands right after the size was looked up: the worst moment."""

    def head(self, bucket: str, obj: str) -> ObjectMeta:
        meta = super().head(bucket, obj)
        small = self.tmp / "small"
        small.write_bytes(b"tiny")
        os.replace(small, self.path(bucket, obj))
        return meta


async def test_hpush_length_and_body_come_from_one_file(tmp_path: Path,
                                                        aiohttp_server: Any) -> None:
    async def echo(request: web.Request) -> web.Response:
        # like the seed's md5 server: read exactly Content-Length bytes
        n = int(request.headers["Content-Length"])
        return web.Response(body=await request.content.readexactly(n))

    app = web.Application()
    app.router.add_post("/", echo)
    server = await aiohttp_server(app)
    store = ReplacedAfterHead(tmp_path)

    async def one(data: bytes) -> Any:
        yield data

    await store.put("b", "obj", one(os.urandom(2 << 20)))
    transformer = EchoTransformer(str(server.make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as session:
        async def run() -> bytes:
            async with open_transform(session, transformer, "hpush://", "echo", store, "b",
                                      "obj") as r:
                return await r.read()

        out = await asyncio.wait_for(run(), 10)
    assert out == b"tiny"
