"""Placement: which target owns an object, by highest random weight (HRW).

Every target gets a pseudo-random weight per object name; the heaviest wins.
Adding or removing a target moves only the objects that target wins or
owned, and every node computes the same answer from the same member list
without coordination. The hash is blake2b (stdlib, keyed by nothing): fast
enough for per-request use and stable across processes and Python versions.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b


def weight(target_id: str, key: str) -> int:
    """The HRW weight of ``key`` on ``target_id`` (a 64-bit integer)."""
    digest = blake2b(f"{target_id}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def object_key(bucket: str, obj: str) -> str:
    return f"{bucket}/{obj}"


def owner(key: str, target_ids: Iterable[str]) -> str:
    """The target that owns ``key``; raises ValueError when there is none."""
    best_id = None
    best_w = -1
    for tid in target_ids:
        w = weight(tid, key)
        if w > best_w or (w == best_w and best_id is not None and tid < best_id):
            best_id, best_w = tid, w
    if best_id is None:
        raise ValueError("no targets to place on")
    return best_id
