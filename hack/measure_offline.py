#!/usr/bin/env python3
"""Measure an offline md5 job against a plain Python loop over the same files.

    python hack/measure_offline.py [--objects 10000] [--size 65536] [--targets 3]
                                   [--repeat N] [--profile DIR]

Starts a local cluster (``aisetl up``) in a temporary directory, builds the
seed's md5 ETL (python3 runtime), stores N random objects, then times:

1. ``etlbck`` from POST to "finished" (the results written, fsynced, on their
   HRW owners), and the same as a dry run (transform only);
2. the baseline: one Python process that reads each object file from the
   targets' data dirs, md5s it and writes the 32-byte result to a file — with
   fsync (what the object store does for every object) and without.

Prints objects/s and MB/s of input for each (MB = 10^6 bytes), and for each
job the CPU it cost per object in each role (targets, transformers, gateway;
``psutil`` CPU times before and after, no profiler attached): a steadier
measure than wall time on a machine whose disk (fsync) is shared. With
``--repeat N`` the jobs run N times (into new buckets). With ``--profile DIR``
one more job runs with py-spy attached to one target and to its transformer
(raw collapsed stacks in DIR; summarized like ``hack/bench.py --profile``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "sidecar")]

from tests.offline.helpers import MD5_CODE, build, put_many, start_job  # noqa: E402
from tests.support.cluster import LocalCluster, http  # noqa: E402

sys.path.insert(0, str(ROOT / "hack"))
from bench import summarize_raw  # noqa: E402


def roles(c: LocalCluster) -> dict[str, list[psutil.Process]]:
    targets = [c.role_process(t["id"]) for t in c.smap()]
    return {"targets": targets,
            "transformers": [p for t in targets for p in t.children(recursive=True)],
            "gateway": [c.role_process("gateway")]}


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def run_job(c: LocalCluster, msg: dict[str, object]) -> tuple[float, dict[str, object], str]:
    """Wall seconds, final status, and CPU ms per object of each role."""
    procs = roles(c)
    before = {k: cpu(v) for k, v in procs.items()}
    t0 = time.perf_counter()
    status, xid = start_job(c, "bench", msg)
    assert status == 200, xid
    while True:
        st = json.loads(http("GET", f"{c.endpoint}/v1/xactions/{xid}")[1])
        if st["finished"]:
            secs = time.perf_counter() - t0
            n = max(int(st["objects"]), 1)
            per = {k: 1000 * (cpu(v) - before[k]) / n for k, v in procs.items()}
            text = ", ".join(f"{k} {ms:.2f}" for k, ms in per.items())
            return secs, st, f"CPU ms/object: {text}, total {sum(per.values()):.2f}"
        time.sleep(0.02)


def profiled_job(c: LocalCluster, out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t1 = c.role_process(c.smap()[0]["id"])
    runtime = max(t1.children(), key=lambda p: len(p.children()))
    spies = [subprocess.Popen(["py-spy", "record", "--format", "raw", "--rate", "200",
                               "--output", str(out / f"{name}.txt"), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, args in (("target", ["--pid", str(t1.pid)]),
                                ("transformer", ["--pid", str(runtime.pid),
                                                 "--subprocesses"]))]
    time.sleep(1.0)  # py-spy attached
    secs, st, cpu_text = run_job(c, {"action": "etlbck", "name": "bench-prof",
                                     "value": {"id": "md5bench"}})
    assert st["objects"] == n, st
    for p in spies:
        p.send_signal(2)  # SIGINT: py-spy writes its output and exits
        p.wait(30)
    print(f"profiled job (py-spy attached): {n / secs:.0f} objects/s; {cpu_text}")
    for name in ("target", "transformer"):
        if (out / f"{name}.txt").exists():
            print(f"\n## {name}: top frames by own samples\n")
            print(summarize_raw(out / f"{name}.txt"))


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
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--profile", metavar="DIR")
    a = p.parse_args()
    total = a.objects * a.size
    rows: list[tuple[str, float]] = []
    cpu_rows: list[tuple[str, str]] = []
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
            for r in range(a.repeat):
                os.sync()
                secs, st, text = run_job(c, {"action": "etlbck", "name": f"bench-md5-{r}",
                                             "value": {"id": "md5bench"}})
                assert st["objects"] == a.objects and st["errors"] == 0, st
                rows.append(("etlbck md5 job (written, fsynced)", secs))
                cpu_rows.append(("job", text))
                secs, st, text = run_job(c, {"action": "etlbck", "name": "bench-dry",
                                             "value": {"id": "md5bench", "dry_run": True}})
                assert st["objects"] == a.objects, st
                rows.append(("etlbck md5 dry run", secs))
                cpu_rows.append(("dry run", text))
            if a.profile:
                profiled_job(c, Path(a.profile), a.objects)
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
    for name, text in cpu_rows:
        print(f"{name:8} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
