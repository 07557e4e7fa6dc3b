"""Offline (bucket-to-bucket) ETL jobs: the request, the naming rule, progress.

An ``etlbck`` job transforms every object of a source bucket with an ETL and
stores the results in a destination bucket. This module is pure: it parses
the request (the seed's shape and AIStore 3.3/3.4's variants), decides the
name of each result, and folds per-target progress into one job status. The
gateway and targets do the I/O.

Naming (``Naming.new_name``), applied to the source object name ``N``:

1. ``N`` splits into a *stem* and an *extension*: the extension is what
   follows the last ``.`` of the last path segment, unless that dot starts
   the segment (``a/b.tar.gz`` -> ``a/b.tar`` + ``gz``; ``a/.cfg`` and
   ``a/README`` have none).
2. ``ext`` as a string replaces the extension (or adds one):
   ``x.in`` -> ``x.out``, ``README`` -> ``README.out``. ``ext`` as a map
   ``{"in": "out"}`` changes only the extensions it names; the longest key
   that the last segment ends with (as ``.key``) wins, so ``{"tar.gz": "tgz"}``
   works, and the key ``""`` stands for "no extension". Leading dots in keys
   and values are ignored; a value ``""`` drops the extension.
3. ``suffix`` is appended to the stem, before the extension:
   ``x.in`` + suffix ``-md5`` + ext ``out`` -> ``x-md5.out``.
4. ``prefix`` is prepended to the whole name, literally (add the ``/``
   yourself if you want a directory): ``a/x.in`` -> ``out/a/x.in``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from aisetl.model.errors import InvalidName, InvalidRequest
from aisetl.model.names import validate_bucket, validate_object

KIND = "etlbck"
MAX_ERRORS_LISTED = 10
"""How many per-object errors a target keeps (object + reason) besides the count."""

RECORD_JOB = "job"
RECORD_REPORT = "report"

_EXT_RE = re.compile(r"^[^/\x00]{0,64}$")


# --- naming ---------------------------------------------------------------------------------
def _split_ext(name: str) -> tuple[str, str | None]:
    """``a/b.tar.gz`` -> (``a/b.tar``, ``gz``); no extension -> (name, None)."""
    last = name.rpartition("/")[2]
    dot = last.rfind(".")
    if dot <= 0:
        return name, None
    return name[: len(name) - len(last) + dot], last[dot + 1:]


def _clean_ext(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not _EXT_RE.match(value):
        raise InvalidRequest(f"{field_name}: {value!r} is not an extension: give text without "
                             "'/', e.g. \"out\" or {\"in\": \"out\"}", field=field_name)
    return value.lstrip(".")


@dataclass(frozen=True)
class Naming:
    """How a source object name becomes the destination name (see the module doc)."""

    prefix: str = ""
    suffix: str = ""
    ext: str | None = None
    ext_map: tuple[tuple[str, str], ...] = ()

    def new_name(self, name: str) -> str:
        stem, ext = _split_ext(name)
        if self.ext is not None:
            ext = self.ext or None
        elif self.ext_map:
            last = name.rpartition("/")[2]
            for old, new in self.ext_map:  # longest key first
                if old == "" and ext is None:
                    ext = new or None
                    break
                if old and last.endswith("." + old) and len(last) > len(old) + 1:
                    stem, ext = name[: len(name) - len(old) - 1], new or None
                    break
        return self.prefix + stem + self.suffix + ("." + ext if ext else "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prefix": self.prefix, "suffix": self.suffix}
        if self.ext is not None:
            out["ext"] = self.ext
        elif self.ext_map:
            out["ext"] = dict(self.ext_map)
        return out

    @classmethod
    def parse(cls, value: dict[str, Any], where: str = "value") -> Naming:
        prefix = value.get("prefix") or ""
        suffix = value.get("suffix") or ""
        if not isinstance(prefix, str):
            raise InvalidRequest(f"{where}.prefix: expected text such as \"md5/\"",
                                 field=f"{where}.prefix")
        if prefix:
            try:
                validate_object(prefix + "x")
            except InvalidName as e:
                raise InvalidRequest(f"{where}.prefix: {prefix!r} cannot start object names "
                                     f"({e.message})", field=f"{where}.prefix") from e
        if not isinstance(suffix, str) or "/" in suffix or "\x00" in suffix:
            raise InvalidRequest(f"{where}.suffix: {suffix!r} must be text without '/', "
                                 "e.g. \"-md5\"", field=f"{where}.suffix")
        raw = value.get("ext")
        if raw is None or raw == "" or raw == {}:
            return cls(prefix, suffix)
        if isinstance(raw, str):
            return cls(prefix, suffix, ext=_clean_ext(raw, f"{where}.ext"))
        if isinstance(raw, dict):
            pairs = [(_clean_ext(k, f"{where}.ext"), _clean_ext(v, f"{where}.ext"))
                     for k, v in raw.items()]
            pairs.sort(key=lambda kv: -len(kv[0]))
            return cls(prefix, suffix, ext_map=tuple(pairs))
        raise InvalidRequest(f"{where}.ext: expected a string (the new extension) or a map "
                             "{\"old\": \"new\"}, got " + type(raw).__name__,
                             field=f"{where}.ext")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Naming:
        return cls.parse(d, "naming")


# --- the request ------------------------------------------------------------------------------
def _bucket_name(raw: Any, field_name: str) -> str:
    """A destination given as ``name``, ``ais://name``, ``ais/@ns/name`` or {"name": ...}."""
    if isinstance(raw, dict):
        raw = raw.get("name")
    if not isinstance(raw, str) or not raw:
        raise InvalidRequest(f"{field_name}: name the destination bucket, e.g. "
                             "{\"action\": \"etlbck\", \"name\": \"transform-md5\", ...}",
                             field=field_name)
    name = raw.removeprefix("ais://")
    if "/" in name:  # AIStore's "provider/namespace/name" query form
        parts = [p for p in name.split("/") if p]
        name = parts[-1] if parts and parts[0] == "ais" else name
    try:
        return validate_bucket(name)
    except InvalidName as e:
        raise InvalidRequest(f"{field_name}: {e.message}", field=field_name) from e


def _flag(value: dict[str, Any], key: str) -> bool:
    v = value.get(key, False)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", ""):
        return v.lower() in ("true", "1")
    raise InvalidRequest(f"value.{key}: expected true or false, got {v!r}", field=f"value.{key}")


@dataclass(frozen=True)
class EtlBckRequest:
    """A validated ``etlbck`` request (the ETL's existence is checked by the caller)."""

    src: str
    dst: str
    etl: str
    naming: Naming
    dry_run: bool = False
    stop_on_error: bool = False


def parse_etlbck(src: str, msg: dict[str, Any], bck_to_query: str | None = None
                 ) -> EtlBckRequest:
    """Parse ``{"action": "etlbck", "name": TO, "value": {...}}`` for source ``src``.

    The destination may also come as ``value.bck_to`` (AIStore 3.4) or a
    ``?bck_to=`` query (3.3). ``value.id`` may be missing here: the caller
    answers 404 for a missing or unknown ETL.
    """
    value = msg.get("value") if msg.get("value") is not None else {}
    if not isinstance(value, dict):
        raise InvalidRequest("value: expected a JSON object such as {\"id\": \"ETL_ID\", "
                             "\"ext\": \"out\"}", field="value")
    if msg.get("name"):
        dst = _bucket_name(msg["name"], "name")
    elif value.get("bck_to"):
        dst = _bucket_name(value["bck_to"], "value.bck_to")
    elif bck_to_query:
        dst = _bucket_name(bck_to_query, "bck_to")
    else:
        dst = _bucket_name(None, "name")
    if dst == src:
        raise InvalidRequest(f"name: the destination bucket {dst!r} is the source: choose "
                             "another bucket (it is created when missing)", field="name")
    etl = value.get("id") or value.get("etl_name") or value.get("name") or ""
    if not isinstance(etl, str):
        raise InvalidRequest("value.id: expected the ETL ID as a string", field="value.id")
    return EtlBckRequest(src=src, dst=dst, etl=etl, naming=Naming.parse(value),
                         dry_run=_flag(value, "dry_run"),
                         stop_on_error=_flag(value, "stop_on_error"))


# --- the job record (control store) -------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """What the gateway records and sends to every target."""

    id: str
    etl: str
    src: str
    dst: str
    naming: Naming
    dry_run: bool
    stop_on_error: bool
    targets: tuple[str, ...]
    """Target IDs the job runs on, fixed at start: results are placed by HRW over these."""
    created: float = 0.0
    aborted: bool = False
    abort_reason: str = ""

    @classmethod
    def from_request(cls, job_id: str, req: EtlBckRequest, targets: list[str],
                     created: float) -> Job:
        return cls(job_id, req.etl, req.src, req.dst, req.naming, req.dry_run,
                   req.stop_on_error, tuple(sorted(targets)), created)

    def abort(self, reason: str) -> Job:
        return replace(self, aborted=True, abort_reason=reason)

    def to_record(self) -> dict[str, Any]:
        return {"type": RECORD_JOB, "kind": KIND, "id": self.id, "etl": self.etl,
                "src": self.src, "dst": self.dst, "naming": self.naming.to_dict(),
                "dry_run": self.dry_run, "stop_on_error": self.stop_on_error,
                "targets": list(self.targets), "created": self.created,
                "aborted": self.aborted, "abort_reason": self.abort_reason}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Job:
        return cls(id=str(d["id"]), etl=str(d["etl"]), src=str(d["src"]), dst=str(d["dst"]),
                   naming=Naming.from_dict(dict(d.get("naming") or {})),
                   dry_run=bool(d.get("dry_run")), stop_on_error=bool(d.get("stop_on_error")),
                   targets=tuple(d.get("targets") or ()), created=float(d.get("created", 0)),
                   aborted=bool(d.get("aborted")), abort_reason=str(d.get("abort_reason", "")))


def report_key(job_id: str, target_id: str) -> str:
    """Control-store key of one target's progress report of one job."""
    return f"{job_id}.{target_id}"


def is_job_record(d: dict[str, Any]) -> bool:
    return d.get("type") == RECORD_JOB and d.get("kind") == KIND


# --- progress ------------------------------------------------------------------------------------
@dataclass
class Progress:
    """One target's share of one job."""

    target: str
    objects: int = 0
    """Objects transformed and written (counted, on a dry run)."""
    bytes: int = 0
    """Bytes of the results written (that would be written, on a dry run)."""
    errors: int = 0
    error_list: list[dict[str, str]] = field(default_factory=list)
    total: int | None = None
    """Objects of the source bucket on this target, once listed."""
    started: float = 0.0
    ended: float = 0.0
    finished: bool = False
    aborted: bool = False
    reason: str = ""
    """Why it aborted (stop request, ETL stopped, first error with stop_on_error)."""
    attempt: int = 1
    """1, or more after the target restarted mid-job and started its share again."""

    def add_error(self, obj: str, reason: str) -> None:
        self.errors += 1
        if len(self.error_list) < MAX_ERRORS_LISTED:
            self.error_list.append({"object": obj, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {"type": RECORD_REPORT, "target": self.target, "objects": self.objects,
                "bytes": self.bytes, "errors": self.errors, "error_list": self.error_list,
                "total": self.total, "started": self.started, "ended": self.ended,
                "finished": self.finished, "aborted": self.aborted, "reason": self.reason,
                "attempt": self.attempt}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        total = d.get("total")
        return cls(target=str(d.get("target", "")), objects=int(d.get("objects", 0)),
                   bytes=int(d.get("bytes", 0)), errors=int(d.get("errors", 0)),
                   error_list=list(d.get("error_list") or []),
                   total=None if total is None else int(total),
                   started=float(d.get("started", 0)), ended=float(d.get("ended", 0)),
                   finished=bool(d.get("finished")), aborted=bool(d.get("aborted")),
                   reason=str(d.get("reason", "")), attempt=int(d.get("attempt", 1)))


RUNNING = "running"
FINISHED = "finished"
ABORTED = "aborted"
ABORTING = "aborting"
FAILED = "failed"


def aggregate(job: Job, per_target: dict[str, Progress | None],
              notes: dict[str, str] | None = None) -> dict[str, Any]:
    """The job status: totals plus each target's progress.

    ``per_target[t] is None`` means target ``t`` has not reported anything
    (not started yet, or unreachable with no saved report); ``notes`` says why.
    The state is ``running`` (``aborting`` once aborted) until every target
    finished, then ``aborted`` if the job or any share of it aborted,
    ``failed`` if any object failed, else ``finished``.
    """
    notes = notes or {}
    targets: dict[str, Any] = {}
    objects = nbytes = errors = 0
    listed: list[dict[str, str]] = []
    starts: list[float] = []
    ends: list[float] = []
    total: int | None = 0
    finished = True
    aborted = job.aborted
    reasons: list[str] = [job.abort_reason] if job.abort_reason else []
    for tid in job.targets:
        p = per_target.get(tid)
        if p is None:
            finished = False
            total = None
            targets[tid] = {"target": tid, "state": "unknown", "note": notes.get(tid, "")}
            continue
        objects += p.objects
        nbytes += p.bytes
        errors += p.errors
        for e in p.error_list:
            if len(listed) < MAX_ERRORS_LISTED:
                listed.append({"target": tid, **e})
        if p.started:
            starts.append(p.started)
        if p.finished:
            ends.append(p.ended)
        else:
            finished = False
        if total is not None:
            total = None if p.total is None else total + p.total
        if p.aborted:
            aborted = True
            if p.reason and p.reason not in reasons:
                reasons.append(f"{tid}: {p.reason}")
        d = p.to_dict()
        d.pop("type", None)
        d["state"] = _state(p.finished, p.aborted, p.errors)
        if tid in notes:
            d["note"] = notes[tid]
        targets[tid] = d
    return {
        "id": job.id, "kind": KIND, "etl": job.etl, "src": job.src, "dst": job.dst,
        "naming": job.naming.to_dict(), "dry_run": job.dry_run,
        "stop_on_error": job.stop_on_error,
        "state": _state(finished, aborted, errors),
        "finished": finished, "aborted": aborted, "abort_reason": "; ".join(reasons),
        "objects": objects, "bytes": nbytes, "errors": errors, "error_list": listed,
        "total": total, "created": job.created,
        "started": min(starts) if starts else 0.0,
        "ended": max(ends) if finished and ends else 0.0,
        "targets": targets,
    }


def _state(finished: bool, aborted: bool, errors: int) -> str:
    if aborted:
        return ABORTED if finished else ABORTING
    if not finished:
        return RUNNING
    return FAILED if errors else FINISHED


def percent(status: dict[str, Any]) -> float | None:
    """Share of objects done (0-100), or None while a target has not listed its objects."""
    total = status.get("total")
    if not total:
        return None if total is None else 100.0
    done = int(status.get("objects", 0)) + int(status.get("errors", 0))
    return min(100.0, math.floor(1000 * done / int(total)) / 10)


__all__ = ["KIND", "EtlBckRequest", "Job", "Naming", "Progress", "aggregate",
           "is_job_record", "parse_etlbck", "percent", "report_key"]
