"""Bucket and object names: what may be stored, and how a CLI argument splits.

Object names may contain ``/`` (they become nested paths on a target's disk),
so anything that could escape the bucket directory is refused here, before any
I/O: ``..`` and ``.`` segments, empty segments, absolute names, NUL bytes and
names longer than the filesystem allows.
"""

from __future__ import annotations

import re

from aisetl.model.errors import InvalidName

BUCKET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_OBJECT_NAME_BYTES = 1024
MAX_SEGMENT_BYTES = 255
PROVIDER_PREFIX = "ais://"


def validate_bucket(name: str) -> str:
    """Return ``name`` if it is a valid bucket name, else raise InvalidName."""
    if not name:
        raise InvalidName("bucket name is empty: give a name such as 'images'", bucket=name)
    if not BUCKET_RE.match(name) or name in (".", ".."):
        raise InvalidName(
            f"invalid bucket name {name!r}: use 1-64 characters of letters, digits, "
            "'-', '_' and '.', starting with a letter, digit or '_'",
            bucket=name,
        )
    return name


def validate_object(name: str, bucket: str | None = None) -> str:
    """Return ``name`` if it can be stored as an object name, else raise InvalidName."""
    if not name:
        raise InvalidName("object name is empty: give a name such as 'shard.in'", bucket=bucket)
    if "\x00" in name:
        raise InvalidName("object name contains a NUL byte: remove it", bucket=bucket)
    if len(name.encode()) > MAX_OBJECT_NAME_BYTES:
        raise InvalidName(
            f"object name is {len(name.encode())} bytes long: the limit is "
            f"{MAX_OBJECT_NAME_BYTES} bytes",
            bucket=bucket,
        )
    if name.startswith("/"):
        raise InvalidName(
            f"object name {name!r} is absolute: drop the leading '/'", bucket=bucket, object=name
        )
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidName(
                f"object name {name!r} has an empty, '.' or '..' path segment: "
                "names may contain '/' but every segment must be a plain name",
                bucket=bucket,
                object=name,
            )
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidName(
                f"object name {name!r} has a path segment longer than "
                f"{MAX_SEGMENT_BYTES} bytes: split it with '/'",
                bucket=bucket,
                object=name,
            )
    return name


def split_bucket_object(arg: str) -> tuple[str, str]:
    """Split a CLI argument ``[ais://]BUCKET[/OBJECT]`` into (bucket, object or '')."""
    if arg.startswith(PROVIDER_PREFIX):
        arg = arg[len(PROVIDER_PREFIX):]
    elif "://" in arg:
        provider = arg.split("://", 1)[0]
        raise InvalidName(
            f"unsupported provider {provider!r} in {arg!r}: only 'ais://' buckets exist here"
        )
    bucket, _, obj = arg.partition("/")
    return validate_bucket(bucket), obj
