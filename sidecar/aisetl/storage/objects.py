"""Objects as files on a target's disk, written so that nothing half-done shows.

Layout under the target's data dir::

    buckets/<bucket>/<object name>    the objects (names may contain '/')
    tmp/                              uploads in flight (emptied at start-up)
    trash/                            destroyed buckets, removed in the background

A PUT streams into a temporary file, fsyncs it, records size and checksum in
extended attributes and renames it into place: a reader sees the old object or
the new one, never a partial one, and an upload cut off midway leaves only a
temporary file that is deleted at once (or at the next start-up).

Several small objects can be written together (``ObjectStore.batch``, for
offline jobs' results): each still goes through its own temporary file and is
renamed into place on its own, but their fsyncs run in one worker thread and
the destroyed-bucket check is made once, just before the renames.

Checksums are CRC-32 (zlib, several GB/s): an integrity check, not a content
address. Reads are served by the caller with sendfile (``FileResponse``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import time
import uuid
import zlib
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path

from aisetl.model.errors import (
    AisError,
    BucketNotFound,
    Conflict,
    InvalidName,
    ObjectNotFound,
    Unavailable,
)
from aisetl.model.names import validate_bucket, validate_object

XATTR_CKSUM = "user.aisetl.cksum"
CKSUM_TYPE = "crc32"


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    size: int
    checksum: str
    mtime: float

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size, "checksum": self.checksum,
                "checksum_type": CKSUM_TYPE, "mtime": self.mtime}


class ObjectStore:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.buckets = self.root / "buckets"
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"
        for d in (self.buckets, self.tmp, self.trash):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # uploads cut off by a crash
            leftover.unlink(missing_ok=True)
        for leftover in self.trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self._xattrs = self._probe_xattrs()
        # bumped when a bucket's data is destroyed: a PUT that started before
        # must not recreate the bucket's directory when it commits
        self._generation: dict[str, int] = {}

    def _probe_xattrs(self) -> bool:
        probe = self.tmp / f"probe-{uuid.uuid4().hex}"
        probe.touch()
        try:
            os.setxattr(probe, XATTR_CKSUM, b"0")
            return True
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)

    # --- paths -----------------------------------------------------------------------
    def path(self, bucket: str, obj: str) -> Path:
        validate_bucket(bucket)
        validate_object(obj, bucket)
        return self.buckets / bucket / obj

    # --- writes ----------------------------------------------------------------------
    def _new_tmp(self) -> tuple[Path, int]:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def _seal(self, tmp: Path, cksum: str) -> None:
        """Make a closed temporary file durable, with its checksum (blocking: in a thread,
        which opens and closes its own descriptor)."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            if self._xattrs:
                os.setxattr(fd, XATTR_CKSUM, cksum.encode())
        finally:
            os.close(fd)

    def _check_generation(self, bucket: str, generation: int, obj: str) -> None:
        if self._generation.get(bucket, 0) != generation:
            raise BucketNotFound(f"bucket {bucket!r} was destroyed while {obj!r} was "
                                 "being written: nothing was stored", bucket=bucket)

    async def put(self, bucket: str, obj: str, chunks: AsyncIterable[bytes]) -> ObjectMeta:
        """Stream ``chunks`` into ``bucket/obj``; atomic and durable on return."""
        final = self.path(bucket, obj)
        generation = self._generation.get(bucket, 0)
        tmp, fd = self._new_tmp()
        crc = 0
        size = 0
        try:
            try:
                async for chunk in chunks:
                    _write_all(fd, chunk)
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
                await asyncio.to_thread(os.fsync, fd)
                cksum = f"{crc:08x}"
                if self._xattrs:
                    os.setxattr(fd, XATTR_CKSUM, cksum.encode())
            finally:
                os.close(fd)
            self._check_generation(bucket, generation, obj)
            self._install(tmp, final, bucket, obj)  # no await since the check: atomic
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectMeta(obj, size, cksum, time.time())

    def batch(self, bucket: str) -> BatchWrite:
        """Several small objects of ``bucket`` written together (see ``BatchWrite``)."""
        return BatchWrite(self, bucket)

    def _install(self, tmp: Path, final: Path, bucket: str, obj: str) -> None:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            os.replace(tmp, final)
        except (NotADirectoryError, FileExistsError, IsADirectoryError) as e:
            raise Conflict(
                f"object name {obj!r} clashes with an existing object: one name cannot be both "
                "an object and a prefix ('a' and 'a/b'); rename one of them",
                bucket=bucket, object=obj) from e

    async def delete(self, bucket: str, obj: str) -> None:
        p = self.path(bucket, obj)
        try:
            if p.is_dir():
                raise FileNotFoundError
            p.unlink()
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectNotFound(f"object {bucket}/{obj} does not exist",
                                 bucket=bucket, object=obj) from e
        self._prune_dirs(p.parent, self.buckets / bucket)

    @staticmethod
    def _prune_dirs(d: Path, stop: Path) -> None:
        while d != stop and stop in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    def destroy_bucket(self, bucket: str) -> Path | None:
        """Make a bucket's data vanish at once (renamed into trash); return the trash
        path, which the caller deletes (``shutil.rmtree``, in a thread if large).

        Call it on the event loop thread: it and the commit step of ``put`` must
        not interleave.
        """
        validate_bucket(bucket)
        self._generation[bucket] = self._generation.get(bucket, 0) + 1
        src = self.buckets / bucket
        if not src.exists():
            return None
        dst = self.trash / f"{bucket}.{uuid.uuid4().hex[:8]}"
        os.replace(src, dst)
        return dst

    # --- reads -----------------------------------------------------------------------
    def head(self, bucket: str, obj: str) -> ObjectMeta:
        p = self.path(bucket, obj)
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectNotFound(f"object {bucket}/{obj} does not exist",
                                 bucket=bucket, object=obj) from e
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"object {bucket}/{obj} does not exist",
                                 bucket=bucket, object=obj)
        return ObjectMeta(obj, st.st_size, self._cksum(p), st.st_mtime)

    def _cksum(self, p: Path) -> str:
        if not self._xattrs:
            return ""
        try:
            return os.getxattr(p, XATTR_CKSUM).decode()
        except OSError:
            return ""

    def listing(self, bucket: str, prefix: str = "", start_after: str = "",
             limit: int = 1000, with_checksum: bool = False) -> list[ObjectMeta]:
        """Up to ``limit`` objects in name order, names > start_after, with prefix."""
        validate_bucket(bucket)
        if "\x00" in prefix:
            raise InvalidName("prefix contains a NUL byte", bucket=bucket)
        root = self.buckets / bucket
        out: list[ObjectMeta] = []

        def walk(d: Path, rel: str) -> bool:
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                return True
            # sort so that the walk yields full names in lexicographic order:
            # a directory 'a' sorts as 'a/' among its siblings
            entries.sort(key=lambda e: e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
            for e in entries:
                name = rel + e.name
                if e.is_dir(follow_symlinks=False):
                    sub = name + "/"
                    if not (sub.startswith(prefix) or prefix.startswith(sub)):
                        continue
                    if start_after and sub <= start_after[: len(sub)] and \
                            not start_after.startswith(sub):
                        continue
                    if not walk(Path(e.path), sub):
                        return False
                elif e.is_file(follow_symlinks=False):
                    if not name.startswith(prefix) or name <= start_after:
                        continue
                    st = e.stat()
                    out.append(ObjectMeta(name, st.st_size,
                                          self._cksum(Path(e.path)) if with_checksum else "",
                                          st.st_mtime))
                    if len(out) >= limit:
                        return False
            return True

        walk(root, "")
        return out

    def iter_names(self, bucket: str) -> list[str]:
        """All object names of a bucket on this target (for offline jobs)."""
        names: list[str] = []
        start = ""
        while True:
            page = self.listing(bucket, start_after=start, limit=10_000)
            names.extend(m.name for m in page)
            if len(page) < 10_000:
                return names
            start = page[-1].name

    def iter_sizes(self, bucket: str) -> list[tuple[str, int]]:
        """All (name, size) of a bucket on this target, in name order (offline jobs)."""
        out: list[tuple[str, int]] = []
        start = ""
        while True:
            page = self.listing(bucket, start_after=start, limit=10_000)
            out.extend((m.name, m.size) for m in page)
            if len(page) < 10_000:
                return out
            start = page[-1].name

    def bucket_dirs(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in self.buckets.iterdir() if p.is_dir())
        return []


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class _Pending:
    name: str
    tmp: Path | None = None
    final: Path | None = None
    size: int = 0
    cksum: str = ""
    error: AisError | None = None


class BatchWrite:
    """Small objects of one bucket, each written like ``ObjectStore.put``, committed together.

    ``add`` writes one object's bytes to its own temporary file at once (no
    fsync yet); ``commit`` fsyncs every one of them in one worker thread (and
    records their checksums), checks once that the bucket was not destroyed
    meanwhile, and renames each into place. Each object is atomic on its own:
    a reader sees it whole or not at all; an object is only reported written
    (an ``ObjectMeta`` from ``commit``) after its fsync and rename. Leaving the
    ``async with`` block without a commit (an error, a cancellation) removes
    every temporary file: nothing of the batch shows. Files are closed after
    writing, so a big batch does not hold many descriptors.

    ``commit`` answers ``(name, result)`` in the order of ``add``: an
    ``ObjectMeta``, or the ``AisError`` of that one object (a name that cannot
    be stored, a name that clashes with a prefix); a destroyed bucket fails the
    whole commit (``BucketNotFound``), and so does ``proceed`` answering False
    right before the renames (the sender went away: ``Unavailable``).
    """

    def __init__(self, store: ObjectStore, bucket: str) -> None:
        validate_bucket(bucket)
        self.store = store
        self.bucket = bucket
        self.generation = store._generation.get(bucket, 0)
        self._items: list[_Pending] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, obj: str, data: bytes | bytearray | memoryview) -> None:
        try:
            final = self.store.path(self.bucket, obj)
        except AisError as e:
            self._items.append(_Pending(obj, error=e))
            return
        tmp, fd = self.store._new_tmp()
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._items.append(_Pending(obj, tmp, final, len(data), f"{zlib.crc32(data):08x}"))

    def _seal_all(self) -> None:
        for item in self._items:
            if item.tmp is not None:
                self.store._seal(item.tmp, item.cksum)

    async def commit(self, proceed: Callable[[], bool] | None = None
                     ) -> list[tuple[str, ObjectMeta | AisError]]:
        """Make every added object durable and visible; each one's result, in order."""
        if any(i.tmp is not None for i in self._items):
            await asyncio.to_thread(self._seal_all)
            self.store._check_generation(self.bucket, self.generation, self._items[0].name)
            if proceed is not None and not proceed():
                raise Unavailable(f"the sender of {len(self._items)} objects for bucket "
                                  f"{self.bucket!r} went away: nothing was stored",
                                  bucket=self.bucket)
        out: list[tuple[str, ObjectMeta | AisError]] = []
        now = time.time()
        # no await from the generation check to the last rename: atomic against
        # destroy_bucket, as in ObjectStore.put
        for item in self._items:
            if item.tmp is None or item.final is None:
                out.append((item.name, item.error or AisError("not written")))
                continue
            try:
                self.store._install(item.tmp, item.final, self.bucket, item.name)
            except AisError as e:
                item.tmp.unlink(missing_ok=True)
                out.append((item.name, e))
                continue
            item.tmp = None
            out.append((item.name, ObjectMeta(item.name, item.size, item.cksum, now)))
        self._items = []
        return out

    def discard(self) -> None:
        for item in self._items:
            if item.tmp is not None:
                item.tmp.unlink(missing_ok=True)
        self._items = []

    async def __aenter__(self) -> BatchWrite:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.discard()
