"""The local control store: records as small files in the state directory.

Layout under ``<state>/control/``::

    buckets/<name>.json          bucket records
    targets/<id>.json            membership: URL, node and heartbeat time
    etls/<document-name>.yaml    ETL declarations (ConfigMap-shaped YAML)
    etl-status/<id>/<target>.json
    xactions/<id>.json

Every write goes to a temporary file in the same directory and is renamed into
place, so readers (other processes) never see half a record; creates use
``link`` so that two gateways racing on one name cannot both win.

Watching is done by comparing directory signatures (names, sizes, mtimes) every
``poll_interval``: the polling stays inside this class, callers just iterate.
A target counts as live while its heartbeat is younger than ``dead_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from aisetl.control.base import (
    ALL_KINDS,
    BUCKETS,
    ETL_STATUS,
    ETLS,
    TARGETS,
    XACTIONS,
    ControlStore,
)
from aisetl.model.cluster import BucketInfo, TargetInfo
from aisetl.model.errors import (
    BucketExists,
    BucketNotFound,
    EtlExists,
    EtlNotFound,
    InvalidRequest,
)
from aisetl.model.etl import document_name


def _write_atomic(path: Path, data: bytes, fsync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``path`` only if it does not exist; False when it already did."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def _key(name: str) -> str:
    """A record name that is safe as a file name (no '/', no '..')."""
    if not _KEY.match(name) or ".." in name:
        raise InvalidRequest(f"{name!r} is not a valid record name: use letters, digits, "
                             "'_', '-' and '.'", field="id")
    return name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class LocalControlStore(ControlStore):
    def __init__(self, state_dir: str | os.PathLike[str], *, dead_after: float = 3.0,
                 poll_interval: float = 0.1, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(state_dir) / "control"
        self.dead_after = dead_after
        self.poll_interval = poll_interval
        self.clock = clock
        self.dirs = {k: self.root / k for k in ALL_KINDS}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)

    # --- buckets -------------------------------------------------------------------
    async def create_bucket(self, info: BucketInfo) -> None:
        path = self.dirs[BUCKETS] / f"{info.name}.json"
        if not _create_exclusive(path, json.dumps(info.to_dict()).encode()):
            raise BucketExists(f"bucket {info.name!r} already exists", bucket=info.name)

    async def delete_bucket(self, name: str) -> None:
        try:
            (self.dirs[BUCKETS] / f"{name}.json").unlink()
        except FileNotFoundError as e:
            raise BucketNotFound(f"bucket {name!r} does not exist", bucket=name) from e

    async def get_bucket(self, name: str) -> BucketInfo | None:
        d = _read_json(self.dirs[BUCKETS] / f"{name}.json")
        return BucketInfo.from_dict(d) if d else None

    async def list_buckets(self) -> list[BucketInfo]:
        out = []
        for p in sorted(self.dirs[BUCKETS].glob("*.json")):
            d = _read_json(p)
            if d:
                out.append(BucketInfo.from_dict(d))
        return out

    # --- membership ----------------------------------------------------------------
    async def heartbeat(self, target: TargetInfo) -> None:
        rec = TargetInfo(target.id, target.url, target.node, self.clock())
        _write_atomic(self.dirs[TARGETS] / f"{target.id}.json",
                      json.dumps(rec.to_dict()).encode())

    async def leave(self, target_id: str) -> None:
        (self.dirs[TARGETS] / f"{target_id}.json").unlink(missing_ok=True)

    async def live_targets(self) -> list[TargetInfo]:
        return self._live()

    # --- ETL declarations ----------------------------------------------------------
    def _etl_path(self, etl_id: str) -> Path:
        return self.dirs[ETLS] / f"{_key(document_name(etl_id))}.yaml"

    async def create_etl(self, doc: dict[str, Any]) -> None:
        etl_id = doc["data"]["id"]
        path = self._etl_path(etl_id)
        if not _create_exclusive(path, yaml.safe_dump(doc).encode()):
            other = ((self._read_etl(path) or {}).get("data") or {}).get("id", etl_id)
            same = "" if other == etl_id else \
                f" as {other!r} (IDs compare case-insensitively, '_' equals '-')"
            raise EtlExists(f"ETL {etl_id!r} already exists{same}: stop it first "
                            f"(ais etl stop {other}) or choose another name", etl=etl_id)

    async def delete_etl(self, etl_id: str) -> None:
        path = self._etl_path(etl_id)
        doc = self._read_etl(path)
        if doc is None or doc.get("data", {}).get("id") != etl_id:
            raise EtlNotFound(f"ETL {etl_id!r} does not exist (ais etl ls lists them)",
                              etl=etl_id)
        path.unlink(missing_ok=True)
        shutil.rmtree(self.dirs[ETL_STATUS] / etl_id, ignore_errors=True)

    @staticmethod
    def _read_etl(path: Path) -> dict[str, Any] | None:
        try:
            doc = yaml.safe_load(path.read_bytes())
        except (FileNotFoundError, yaml.YAMLError):
            return None
        return doc if isinstance(doc, dict) else None

    async def list_etls(self) -> list[dict[str, Any]]:
        docs = (self._read_etl(p) for p in sorted(self.dirs[ETLS].glob("*.yaml")))
        return [d for d in docs if d]

    async def put_etl_status(self, etl_id: str, target_id: str, status: dict[str, Any]) -> None:
        _key(target_id)
        if not self._etl_path(etl_id).exists():
            return  # stopped meanwhile: leave no status behind
        d = self.dirs[ETL_STATUS] / etl_id
        d.mkdir(exist_ok=True)
        _write_atomic(d / f"{target_id}.json", json.dumps(status).encode())

    async def etl_statuses(self, etl_id: str) -> dict[str, dict[str, Any]]:
        _key(etl_id)
        out = {}
        for p in sorted((self.dirs[ETL_STATUS] / etl_id).glob("*.json")):
            d = _read_json(p)
            if d is not None:
                out[p.stem] = d
        return out

    # --- offline jobs ----------------------------------------------------------------
    async def put_xaction(self, xid: str, record: dict[str, Any]) -> None:
        _write_atomic(self.dirs[XACTIONS] / f"{_key(xid)}.json", json.dumps(record).encode())

    async def get_xaction(self, xid: str) -> dict[str, Any] | None:
        try:
            return _read_json(self.dirs[XACTIONS] / f"{_key(xid)}.json")
        except InvalidRequest:
            return None

    async def list_xactions(self) -> list[dict[str, Any]]:
        recs = (_read_json(p) for p in sorted(self.dirs[XACTIONS].glob("*.json")))
        return [r for r in recs if r]

    # --- watching ------------------------------------------------------------------
    def _live(self) -> list[TargetInfo]:
        now = self.clock()
        out = []
        for p in sorted(self.dirs[TARGETS].glob("*.json")):
            d = _read_json(p)
            if d is not None:
                t = TargetInfo.from_dict(d)
                if now - t.heartbeat <= self.dead_after:
                    out.append(t)
        return out

    def _signature(self, kind: str) -> tuple[Any, ...]:
        if kind == TARGETS:  # heartbeats rewrite files constantly: only who is live counts
            return tuple((t.id, t.url, t.node) for t in self._live())
        sig = []
        for dirpath, _dirs, files in os.walk(self.dirs[kind]):
            for f in files:
                if f.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(dirpath, f))
                    sig.append((dirpath, f, st.st_mtime_ns, st.st_size))
        sig.sort()
        return tuple(sig)

    async def watch(self) -> AsyncIterator[str]:
        seen: dict[str, tuple[Any, ...]] = {}
        for kind in ALL_KINDS:
            seen[kind] = self._signature(kind)
            yield kind
        while True:
            await asyncio.sleep(self.poll_interval)
            for kind in ALL_KINDS:
                sig = self._signature(kind)
                if sig != seen[kind]:
                    seen[kind] = sig
                    yield kind
