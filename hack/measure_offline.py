#!/usr/bin/env python3
"""Measure an offline md5 job against a plain Python loop over the same files.

    python hack/measure_offline.py [--objects 10000] [--size 65536] [--targets 3]

Starts a local cluster (``aisetl up``) in a temporary directory, builds the
seed's md5 ETL (python3 runtime), stores N random objects, then times:

1. ``etlbck`` from POST to "finished" (the results written, fsynced, on their
   HRW owners), and the same as a dry run (transform only);
2. the baseline: one Python process that reads each object file from the
   targets' data dirs, md5s it and writes the 32-byte result to a file — with
   fsync (what the object store does for every object) and without.

Prints objects/s and MB/s of input for each (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "sidecar")]

from tests.offline.helpers import MD5_CODE, build, put_many, start_job  # noqa: E402
from tests.support.cluster import LocalCluster, http  # noqa: E402


def run_job(c: LocalCluster, msg: dict[str, object]) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    status, xid = start_job(c, "bench", msg)
    assert status == 200, xid
    while True:
        st = json.loads(http("GET", f"{c.endpoint}/v1/xactions/{xid}")[1])
        if st["finished"]:
            return time.perf_counter() - t0, st
        time.sleep(0.02)


def baseline(files: list[Path], out: Path, fsync: bool) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        digest = hashlib.md5(f.read_bytes()).hexdigest().encode()
        with open(out / f"{i}.md5", "wb") as w:
            w.write(digest)
            if fsync:
                os.fsync(w.fileno())
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=10_000)
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--targets", type=int, default=3)
    a = p.parse_args()
    total = a.objects * a.size
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="aisetl-measure-") as tmp:
        c = LocalCluster(Path(tmp) / "state", targets=a.targets,
                         env={"AISETL_LOG_LEVEL": "warning"})
        with c:
            build(c, MD5_CODE, "md5bench")
            t0 = time.perf_counter()
            put_many(c, "bench", {f"obj-{i:06d}": os.urandom(a.size)
                                  for i in range(a.objects)}, concurrency=64)
            print(f"stored {a.objects} objects of {a.size} B in "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
            secs, st = run_job(c, {"action": "etlbck", "name": "bench-md5",
                                   "value": {"id": "md5bench"}})
            assert st["objects"] == a.objects and st["errors"] == 0, st
            rows.append(("etlbck md5 job (written, fsynced)", secs))
            secs, st = run_job(c, {"action": "etlbck", "name": "bench-dry",
                                   "value": {"id": "md5bench", "dry_run": True}})
            assert st["objects"] == a.objects, st
            rows.append(("etlbck md5 dry run", secs))
            files = sorted((c.state / "targets").glob("*/buckets/bench/*"))
            assert len(files) == a.objects
            rows.append(("plain loop: read, md5, write + fsync",
                         baseline(files, Path(tmp) / "base-fsync", True)))
            rows.append(("plain loop: read, md5, write (no fsync)",
                         baseline(files, Path(tmp) / "base", False)))
    print(f"{a.objects} objects x {a.size} B = {total / 1e6:.0f} MB, {a.targets} targets, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':44} {'seconds':>8} {'objects/s':>10} {'MB/s':>8}")
    for name, secs in rows:
        print(f"{name:44} {secs:8.2f} {a.objects / secs:10.0f} {total / 1e6 / secs:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
