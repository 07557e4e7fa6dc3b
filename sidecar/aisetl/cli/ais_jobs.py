"""``ais etl bucket``, ``ais wait xaction``, ``ais stop xaction``: offline jobs.

    ais etl bucket ETL_ID SRC DST [--ext EXT] [--prefix P] [--suffix S]
                   [--dry-run] [--stop-on-error] [--wait [--timeout SECONDS]]
    ais wait xaction XACTION_ID [--timeout SECONDS]
    ais stop xaction XACTION_ID

``etl bucket`` prints the job ID on stdout (so ``XACT_ID=$(ais etl bucket ...)``
works, with or without ``--wait``). Waiting polls ``GET /v1/xactions/<id>``
(every 0.2 s at first, then at most every second), draws a progress bar on
stderr when stderr is a terminal, prints one summary line to stderr at the
end, and exits 0 only when every object was transformed: 1 when the job was
aborted, when some objects failed, or when ``--timeout`` passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from aisetl.cli.client import Client
from aisetl.model.errors import AisError
from aisetl.model.names import split_bucket_object
from aisetl.model.xaction import ABORTED, FAILED, FINISHED, percent

POLL_FIRST = 0.2
POLL_MAX = 1.0


def parse_ext(raw: str) -> str | dict[str, str]:
    """``out`` | ``in:out[,a:b]`` | ``{in:out}`` (AIStore CLI) | JSON ``{"in": "out"}``."""
    text = raw.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
            if isinstance(doc, dict):
                return {str(k): str(v) for k, v in doc.items()}
        except ValueError:
            text = text.strip("{}")
    if ":" not in text:
        return text
    out: dict[str, str] = {}
    for pair in text.split(","):
        old, sep, new = pair.partition(":")
        if not sep:
            raise AisError(f"--ext {raw!r}: write a new extension (out) or pairs old:new "
                           "(in:out,jpg:png)")
        out[old.strip().strip("'\"")] = new.strip().strip("'\"")
    return out


def _bucket(arg: str) -> str:
    bucket, obj = split_bucket_object(arg)
    if obj:
        raise AisError(f"{arg!r} names an object: give a bucket name only")
    return bucket


def cmd_etl_bucket(c: Client, a: argparse.Namespace) -> int:
    value: dict[str, Any] = {"id": a.id, "dry_run": a.dry_run,
                             "stop_on_error": a.stop_on_error}
    if a.ext:
        value["ext"] = parse_ext(a.ext)
    if a.prefix:
        value["prefix"] = a.prefix
    if a.suffix:
        value["suffix"] = a.suffix
    src, dst = _bucket(a.src), _bucket(a.dst)
    body = json.dumps({"action": "etlbck", "name": dst, "value": value}).encode()
    xid = c.request("POST", f"/v1/buckets/{src}", body=body,
                    headers={"Content-Type": "application/json"}).read().decode().strip()
    print(xid, flush=True)
    if not a.wait:
        return 0
    return wait(c, xid, a.timeout)


def _bar(st: dict[str, Any], width: int = 30) -> str:
    pct = percent(st)
    done = int(st.get("objects", 0)) + int(st.get("errors", 0))
    total = st.get("total")
    filled = int(width * (pct or 0) / 100)
    shown = f"{pct:5.1f}%" if pct is not None else "  ...%"
    return (f"\r[{'#' * filled}{' ' * (width - filled)}] {shown} {done}/{total or '?'} objects, "
            f"{_size(int(st.get('bytes', 0)))}, {st.get('errors', 0)} errors ")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def summary(st: dict[str, Any]) -> str:
    secs = max(0.0, float(st.get("ended") or time.time()) - float(st.get("started") or 0))
    what = "would be written (dry run)" if st.get("dry_run") else "written"
    return (f"xaction {st['id']} {st['state']}: {st['objects']} objects, "
            f"{_size(int(st['bytes']))} {what}, {st['errors']} errors, {secs:.1f}s")


def wait(c: Client, xid: str, timeout: float | None) -> int:
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + timeout if timeout else None
    interval = POLL_FIRST
    while True:
        st = c.json("GET", f"/v1/xactions/{xid}")
        if tty:
            sys.stderr.write(_bar(st))
            sys.stderr.flush()
        if st.get("finished"):
            break
        if deadline is not None and time.monotonic() >= deadline:
            if tty:
                sys.stderr.write("\n")
            print(f"ais: xaction {xid} still {st.get('state')} after {timeout:g}s",
                  file=sys.stderr)
            return 1
        time.sleep(interval)
        interval = min(POLL_MAX, interval * 1.5)
    if tty:
        sys.stderr.write("\n")
    state = st.get("state")
    if state == FINISHED:
        print(summary(st), file=sys.stderr)
        return 0
    if state == ABORTED:
        print(f"ais: xaction {xid} was aborted: {st.get('abort_reason') or 'no reason given'}"
              f" ({st['objects']} objects done, {st['errors']} errors)", file=sys.stderr)
        return 1
    if state == FAILED:
        first = "; ".join(f"{e.get('object')}: {e.get('reason')}"
                          for e in st.get("error_list", [])[:3])
        print(f"ais: xaction {xid} finished with {st['errors']} failed objects "
              f"({st['objects']} done); first: {first}", file=sys.stderr)
        return 1
    print(f"ais: xaction {xid} ended in state {state}", file=sys.stderr)
    return 1


def cmd_wait_xaction(c: Client, a: argparse.Namespace) -> int:
    return wait(c, a.id, a.timeout)


def cmd_stop_xaction(c: Client, a: argparse.Namespace) -> int:
    for xid in a.ids:
        st = c.json("DELETE", f"/v1/xactions/{xid}")
        if st.get("state") in (FINISHED, FAILED):
            print(f"xaction {xid} had already finished ({st['state']})")
        else:
            print(f"xaction {xid} aborted ({st['objects']} objects done)")
    return 0


def register_etl(esub: Any) -> None:
    """``ais etl bucket``: called from ``ais_etl.register`` with its subparsers."""
    b = esub.add_parser(
        "bucket", help="transform every object of a bucket into another bucket",
        description="Transform every object of SRC with ETL ID and store the results in DST "
        "(created when missing). Names: PREFIX + stem + SUFFIX + .EXT (see docs/offline.md). "
        "Prints the job (xaction) ID; 'ais wait xaction ID' waits for it, "
        "'ais stop xaction ID' aborts it.")
    b.add_argument("id", metavar="ETL_ID")
    b.add_argument("src", metavar="SRC")
    b.add_argument("dst", metavar="DST")
    b.add_argument("--ext", help="new extension ('out'), or old:new pairs ('in:out,jpg:png' "
                   "or '{\"in\": \"out\"}')")
    b.add_argument("--prefix", help="prepended to every new name (e.g. 'md5/')")
    b.add_argument("--suffix", help="appended to the name before its extension (e.g. '-md5')")
    b.add_argument("--dry-run", action="store_true",
                   help="transform and count objects and bytes, write nothing")
    b.add_argument("--stop-on-error", action="store_true",
                   help="abort the job at the first object that fails")
    b.add_argument("--wait", action="store_true",
                   help="wait for the job (progress bar on a terminal); exit 1 if it fails")
    b.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    b.set_defaults(fn=cmd_etl_bucket)


def register(sub: Any) -> None:
    """``ais wait xaction`` and ``ais stop xaction`` (an EXTENSION_MODULES entry)."""
    w = sub.add_parser("wait", help="wait for a job: ais wait xaction ID",
                       description="Wait for jobs.")
    wsub = w.add_subparsers(dest="what", required=True, metavar="WHAT")
    wx = wsub.add_parser("xaction", help="wait until a job ends",
                         description="Poll a job until it ends. Exit 0 when every object was "
                         "transformed, 1 when it was aborted or some objects failed.")
    wx.add_argument("id", metavar="XACTION_ID")
    wx.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    wx.set_defaults(fn=cmd_wait_xaction)

    s = sub.add_parser("stop", help="abort a job: ais stop xaction ID",
                       description="Stop things.")
    ssub = s.add_subparsers(dest="what", required=True, metavar="WHAT")
    sx = ssub.add_parser("xaction", help="abort jobs",
                         description="Abort jobs: no new object is started, the ones in flight "
                         "are cancelled (nothing half-written stays); finished objects stay.")
    sx.add_argument("ids", nargs="+", metavar="XACTION_ID")
    sx.set_defaults(fn=cmd_stop_xaction)
