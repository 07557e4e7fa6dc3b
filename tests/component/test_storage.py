"""The object store on a real filesystem."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aisetl.model.errors import Conflict, InvalidName, ObjectNotFound
from aisetl.storage.objects import ObjectStore


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_put_is_atomic_and_records_size_and_checksum(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    meta = await store.put("b", "x/y.bin", chunks(b"hello ", b"world"))
    assert meta.size == 11
    assert meta.checksum == "0d4a1185"  # crc32 of b"hello world"
    head = store.head("b", "x/y.bin")
    assert (head.size, head.checksum) == (11, "0d4a1185")
    assert store.path("b", "x/y.bin").read_bytes() == b"hello world"
    assert list(store.tmp.iterdir()) == []


async def test_upload_cut_off_midway_leaves_nothing(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put("b", "obj", broken())
    with pytest.raises(ObjectNotFound):
        store.head("b", "obj")
    assert list(store.tmp.iterdir()) == []


async def test_overwrite_replaces_whole_object(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    await store.put("b", "o", chunks(b"1" * 100))
    await store.put("b", "o", chunks(b"2"))
    assert store.path("b", "o").read_bytes() == b"2"


async def test_object_and_prefix_with_same_name_conflict(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    await store.put("b", "a", chunks(b"x"))
    with pytest.raises(Conflict):
        await store.put("b", "a/b", chunks(b"y"))
    await store.put("b", "c/d", chunks(b"y"))
    with pytest.raises(Conflict):
        await store.put("b", "c", chunks(b"z"))
    assert list(store.tmp.iterdir()) == []


async def test_listing_is_in_name_order_with_prefix_and_pages(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    names = ["a-c", "a/b", "a/c/d", "b", "a.x", "a/c-e", "z/z/z"]
    for n in names:
        await store.put("b", n, chunks(n.encode()))
    assert [m.name for m in store.listing("b")] == sorted(names)
    assert [m.name for m in store.listing("b", prefix="a/")] == ["a/b", "a/c-e", "a/c/d"]
    assert [m.name for m in store.listing("b", prefix="a/c")] == ["a/c-e", "a/c/d"]
    paged: list[str] = []
    start = ""
    while True:
        page = store.listing("b", start_after=start, limit=2)
        paged += [m.name for m in page]
        if len(page) < 2:
            break
        start = page[-1].name
    assert paged == sorted(names)


async def test_delete_removes_empty_parent_dirs(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    await store.put("b", "x/y/z", chunks(b"1"))
    await store.delete("b", "x/y/z")
    assert not (store.buckets / "b" / "x").exists()
    with pytest.raises(ObjectNotFound):
        await store.delete("b", "x/y/z")


async def test_escaping_names_never_touch_the_disk(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    with pytest.raises(InvalidName):
        await store.put("b", "../../evil", chunks(b"x"))
    assert not (tmp_path.parent / "evil").exists()


async def test_leftover_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    ObjectStore(tmp_path)
    (tmp_path / "tmp" / "dead.part").write_bytes(b"partial")
    store = ObjectStore(tmp_path)
    assert list(store.tmp.iterdir()) == []


async def test_bucket_destroyed_during_a_put_stores_nothing(tmp_path: Path) -> None:
    from aisetl.model.errors import BucketNotFound

    store = ObjectStore(tmp_path)
    await store.put("b", "old", chunks(b"x"))

    async def slow() -> AsyncIterator[bytes]:
        yield b"first half "
        trash = store.destroy_bucket("b")  # the gateway's destroy arrives mid-upload
        assert trash is not None
        yield b"second half"

    with pytest.raises(BucketNotFound, match="destroyed while"):
        await store.put("b", "ghost", slow())
    assert not (store.buckets / "b").exists(), "the bucket's directory must not come back"
    assert list(store.tmp.iterdir()) == []
    await store.put("b", "new", chunks(b"y"))  # a new bucket of that name starts empty
    assert [m.name for m in store.listing("b")] == ["new"]
