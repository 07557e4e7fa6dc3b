"""ObjectStore.batch: several small objects committed together, each atomic on its own."""

from __future__ import annotations

import asyncio
import os
import zlib
from pathlib import Path

import pytest

from aisetl.model.errors import BucketNotFound, Conflict, InvalidName, Unavailable
from aisetl.storage import frames
from aisetl.storage.objects import XATTR_CKSUM, ObjectStore


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "data")
    (s.buckets / "b").mkdir()
    return s


def visible(s: ObjectStore) -> set[str]:
    root = s.buckets / "b"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def test_commit_installs_each_object_with_its_checksum_and_reports_in_order(
        store: ObjectStore) -> None:
    async with store.batch("b") as b:
        b.add("x/one", b"first")
        b.add("../bad", b"never")
        b.add("x/one/two", b"clashes with the object x/one")
        b.add("empty", b"")
        assert visible(store) == set(), "nothing shows before the commit"
        done = await b.commit()
    assert [n for n, _ in done] == ["x/one", "../bad", "x/one/two", "empty"]
    assert isinstance(done[1][1], InvalidName) and isinstance(done[2][1], Conflict)
    one = done[0][1]
    assert not isinstance(one, Exception) and (one.size, one.checksum) == \
        (5, f"{zlib.crc32(b'first'):08x}")
    assert visible(store) == {"x/one", "empty"}
    assert store.head("b", "x/one").checksum == one.checksum
    if store._xattrs:
        assert os.getxattr(store.buckets / "b" / "x" / "one", XATTR_CKSUM) == one.checksum.encode()
    assert list(store.tmp.iterdir()) == []


async def test_a_bucket_destroyed_before_the_commit_gets_nothing(store: ObjectStore) -> None:
    with pytest.raises(BucketNotFound):
        async with store.batch("b") as b:
            b.add("a", b"1")
            b.add("c", b"2")
            store.destroy_bucket("b")
            await b.commit()
    assert not (store.buckets / "b").exists(), "the commit did not recreate the bucket"
    assert list(store.tmp.iterdir()) == []


async def test_a_sender_gone_before_the_commit_gets_nothing(store: ObjectStore) -> None:
    with pytest.raises(Unavailable):
        async with store.batch("b") as b:
            b.add("a", b"1")
            await b.commit(lambda: False)
    assert visible(store) == set() and list(store.tmp.iterdir()) == []


async def test_leaving_without_a_commit_removes_every_temporary_file(store: ObjectStore) -> None:
    added = asyncio.Event()

    async def writer() -> None:
        async with store.batch("b") as b:
            b.add("a", b"1" * 1000)
            b.add("c", b"2")
            added.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(writer())
    await asyncio.wait_for(added.wait(), 10)
    assert len(list(store.tmp.iterdir())) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(store.tmp.iterdir()) == [] and visible(store) == set()


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            partial, self.data = self.data, b""
            raise asyncio.IncompleteReadError(partial, n)
        out, self.data = self.data[:n], self.data[n:]
        return out


async def test_frames_round_trip_and_refuse_oversized_lengths_unread() -> None:
    items = [("a", b"x" * 10), ("dir/b", b""), ("c", os.urandom(frames.MAX_OBJECT))]
    body = b"".join(frames.encode(items, piece=7))
    assert len(body) == frames.body_length(items)
    assert [x async for x in frames.read_frames(Bytes(body))] == items
    huge = frames.HEADER.pack(1, 1 << 62) + b"n"  # a reader must not try to read this
    with pytest.raises(frames.FramingError, match="larger than"):
        _ = [x async for x in frames.read_frames(Bytes(huge))]
