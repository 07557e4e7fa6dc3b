"""The body of a multi-object PUT between targets (offline jobs' small results).

``PUT /v1/batch/objects/<bucket>`` carries several small objects in one
request. The body is zero or more frames back to back, and ends with the body::

    frame := name_len (u16, big-endian) | size (u64, big-endian) | name (UTF-8) | size bytes

Every length is checked before anything is read: a name longer than
``MAX_NAME``, an object larger than ``MAX_OBJECT``, more than ``MAX_COUNT``
frames or more than ``MAX_BODY`` bytes in all, a name that is not UTF-8, or a
frame cut short is a ``FramingError`` (400) — no read is ever sized by an
unchecked length prefix, so a receiver holds at most one object of
``MAX_OBJECT`` bytes at a time.

The answer is JSON ``{"results": [...]}``, one entry per frame in order:
``{"name", "size", "checksum"}`` for an object written (fsynced and renamed
into place), or ``{"name", "status", "error", "message"}`` for one that was
not (its name cannot be stored, or clashes with a prefix).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Protocol

from aisetl.model.errors import InvalidRequest

HEADER = struct.Struct(">HQ")
MAX_NAME = 4096
"""Object names are at most 1024 bytes; a longer name field is a broken body."""
MAX_OBJECT = 1 << 20
"""The largest object one frame may carry (offline jobs batch results up to this)."""
MAX_COUNT = 4096
MAX_BODY = 64 << 20


class FramingError(InvalidRequest):
    """A multi-object body that does not follow the frame format."""


class Readable(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


def frame_header(name: str, size: int) -> bytes:
    """The header and name of one frame; the object's ``size`` bytes follow it."""
    raw = name.encode()
    return HEADER.pack(len(raw), size) + raw


def body_length(items: list[tuple[str, bytes]]) -> int:
    return sum(HEADER.size + len(name.encode()) + len(data) for name, data in items)


def encode(items: Iterable[tuple[str, bytes]], piece: int = 256 << 10) -> Iterator[bytes]:
    """A body of objects already in memory, in pieces of about ``piece`` bytes
    (few socket writes for many tiny objects, no copy of the whole body)."""
    parts: list[bytes] = []
    have = 0
    for name, data in items:
        parts.append(frame_header(name, len(data)))
        parts.append(data)
        have += len(data)
        if have >= piece:
            yield b"".join(parts)
            parts, have = [], 0
    if parts:
        yield b"".join(parts)


async def read_frames(stream: Readable) -> AsyncIterator[tuple[str, bytes]]:
    """(name, bytes) of each frame of ``stream``, checking every length first."""
    count = total = 0
    while True:
        try:
            head = await stream.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return  # the body ended between frames: done
            raise FramingError(f"frame {count + 1}: body ends inside a frame header "
                               f"({len(e.partial)} of {HEADER.size} bytes)") from e
        name_len, size = HEADER.unpack(head)
        count += 1
        total += HEADER.size + name_len + size
        if not 0 < name_len <= MAX_NAME:
            raise FramingError(f"frame {count}: name length {name_len} is not within "
                               f"1..{MAX_NAME} bytes")
        if size > MAX_OBJECT:
            raise FramingError(f"frame {count}: object of {size} bytes is larger than "
                               f"{MAX_OBJECT}: send it with a plain PUT")
        if count > MAX_COUNT or total > MAX_BODY:
            raise FramingError(f"body has more than {MAX_COUNT} frames or {MAX_BODY} bytes: "
                               "split it")
        try:
            raw = await stream.readexactly(name_len)
            data = await stream.readexactly(size) if size else b""
        except asyncio.IncompleteReadError as e:
            raise FramingError(f"frame {count}: body ends inside the frame (expected a "
                               f"{name_len}-byte name and {size} bytes)") from e
        try:
            name = raw.decode()
        except UnicodeDecodeError as e:
            raise FramingError(f"frame {count}: name is not UTF-8") from e
        yield name, data


__all__ = ["HEADER", "MAX_BODY", "MAX_COUNT", "MAX_NAME", "MAX_OBJECT", "FramingError",
           "body_length", "encode", "frame_header", "read_frames"]
