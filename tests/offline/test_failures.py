"""Offline jobs when things go wrong: abort, bad objects, dying transformers and targets."""

from __future__ import annotations

import signal
import time

import psutil

from tests.offline.conftest import payload
from tests.offline.helpers import (
    FLAKY_CODE,
    build,
    get_all,
    job_status,
    list_all,
    md5,
    put_many,
    start_job,
    stop_etl,
    tmp_files,
    wait_job,
    wait_progress,
)
from tests.offline.test_etlbck import sh
from tests.support.cluster import LocalCluster, wait_until

# ~0.1 s per object, streaming 1 MiB out in 8 pieces: an abort lands mid-stream.
SLOW_STREAM_CODE = """\
import asyncio, hashlib

async def transform_stream(chunks):
    data = b""
    async for chunk in chunks:
        data += chunk
    h = hashlib.md5(data).hexdigest().encode()
    for _ in range(8):
        await asyncio.sleep(0.012)
        yield h * 4096
"""

SLOW_MD5_CODE = """\
import hashlib, time

def transform(input_bytes):
    time.sleep(0.02)
    return hashlib.md5(input_bytes).hexdigest().encode()
"""


def slow_result(data: bytes) -> bytes:
    return md5(data) * 4096 * 8


def runtime_of(c: LocalCluster, target: str, etl_id: str) -> psutil.Process:
    for p in c.role_process(target).children():
        if any(a.endswith(f"/{etl_id}/code.py") for a in p.cmdline()):
            return p
    raise LookupError(f"no runtime of {etl_id} under {target}")


def test_abort_midway_reports_aborted_and_leaves_no_partial_object(
        oc: LocalCluster, oc_env: dict[str, str]) -> None:
    build(oc, SLOW_STREAM_CODE, "slowstream")
    objects = {f"s{i:04d}": payload(i) for i in range(400)}
    put_many(oc, "abortsrc", objects)
    status, xid = start_job(oc, "abortsrc", {"action": "etlbck", "name": "abortdst",
                                             "value": {"id": "slowstream"}})
    assert status == 200, xid
    wait_progress(oc, xid, 20)
    r = sh(f"ais stop xaction {xid}", oc_env)
    assert r.returncode == 0 and "aborted" in r.stdout, r.stderr
    st = job_status(oc, xid)
    assert (st["state"], st["finished"], st["aborted"]) == ("aborted", True, True)
    assert "aborted by request" in st["abort_reason"]
    assert st["objects"] < len(objects)
    w = sh(f"ais wait xaction {xid}", oc_env)
    assert w.returncode == 1 and "aborted" in w.stderr

    listed = list_all(oc, "abortdst")
    time.sleep(0.5)
    assert list_all(oc, "abortdst") == listed, "nothing is written after the abort returned"
    assert tmp_files(oc) == [], "no upload in flight is left behind"
    assert st["objects"] <= len(listed) <= st["objects"] + 3 * 8  # at most the ones in flight
    got = get_all(oc, "abortdst", list(listed))
    assert got == {n: slow_result(objects[n]) for n in listed}, "every visible object is whole"
    stop_etl(oc, "slowstream")


def test_failing_objects_are_counted_and_listed_and_the_job_goes_on(
        oc: LocalCluster, oc_env: dict[str, str]) -> None:
    build(oc, FLAKY_CODE, "flaky")
    objects = {f"good-{i:03d}": payload(i) for i in range(200)}
    bad = {f"bad-{i}": b"bad object" for i in range(14)}
    put_many(oc, "flakysrc", {**objects, **bad})
    status, xid = start_job(oc, "flakysrc", {"action": "etlbck", "name": "flakydst",
                                             "value": {"id": "flaky"}})
    assert status == 200
    st = wait_job(oc, xid)
    assert (st["state"], st["objects"], st["errors"]) == ("failed", 200, 14)
    assert len(st["error_list"]) == 10
    for e in st["error_list"]:
        assert e["object"] in bad and "refusing a bad object" in e["reason"], e
    assert set(list_all(oc, "flakydst")) == set(objects)
    w = sh(f"ais wait xaction {xid}", oc_env)
    assert w.returncode == 1 and "14 failed objects" in w.stderr and "bad-" in w.stderr

    # stop_on_error: the first failure aborts the job ('bad-*' sort first on every target)
    status, xid = start_job(oc, "flakysrc", {"action": "etlbck", "name": "flakydst2",
                                             "value": {"id": "flaky",
                                                       "stop_on_error": True}})
    st = wait_job(oc, xid)
    assert st["state"] == "aborted" and st["errors"] >= 1
    assert "stop_on_error" in st["abort_reason"]
    assert st["objects"] < 200
    stop_etl(oc, "flaky")


def test_transformer_killed_mid_job_loses_no_object(oc: LocalCluster) -> None:
    build(oc, SLOW_MD5_CODE, "killme")
    objects = {f"k{i:04d}.in": payload(i) for i in range(600)}
    put_many(oc, "killsrc", objects)
    status, xid = start_job(oc, "killsrc", {"action": "etlbck", "name": "killdst",
                                            "value": {"id": "killme"}})
    assert status == 200
    wait_progress(oc, xid, 60)
    victims = [runtime_of(oc, t, "killme") for t in ("t1", "t2")]
    for v in victims:
        v.send_signal(signal.SIGKILL)
    st = wait_job(oc, xid)
    assert (st["state"], st["objects"], st["errors"]) == ("finished", 600, 0), st
    assert runtime_of(oc, "t1", "killme").pid != victims[0].pid, "the transformer restarted"
    expected = {n: md5(d) for n, d in objects.items()}
    assert set(list_all(oc, "killdst")) == set(expected)
    assert get_all(oc, "killdst", list(expected)) == expected
    stop_etl(oc, "killme")


def test_stopping_the_etl_aborts_its_jobs(oc: LocalCluster) -> None:
    build(oc, SLOW_MD5_CODE, "stopme")
    put_many(oc, "stopsrc", {f"p{i:04d}": payload(i) for i in range(600)})
    status, xid = start_job(oc, "stopsrc", {"action": "etlbck", "name": "stopdst",
                                            "value": {"id": "stopme", "dry_run": True}})
    assert status == 200
    wait_progress(oc, xid, 30)
    stop_etl(oc, "stopme")
    st = wait_job(oc, xid, timeout=30)
    assert st["state"] == "aborted" and "ETL stopme was stopped" in st["abort_reason"], st
    assert st["objects"] < 600


def test_target_restarted_mid_job_redoes_its_share_and_nothing_is_lost(
        fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    build(c, SLOW_MD5_CODE, "restart")
    objects = {f"r{i:04d}.in": payload(i) for i in range(600)}
    put_many(c, "rsrc", objects)
    status, xid = start_job(c, "rsrc", {"action": "etlbck", "name": "rdst",
                                        "value": {"id": "restart", "ext": "out"}})
    assert status == 200
    wait_progress(c, xid, 80)
    victim = c.role_process("t2")
    victim.kill()
    victim.wait(10)
    # while t2 is away its last saved report stands in for it
    st = job_status(c, xid)
    assert not st["finished"]
    wait_until(lambda: (c.find_role("t2") or victim).pid != victim.pid, 20, "t2 restart")
    st = wait_job(c, xid, timeout=90)
    assert (st["state"], st["objects"], st["errors"]) == ("finished", 600, 0), st
    assert st["targets"]["t2"]["attempt"] == 2, "t2 started its share again"
    assert st["targets"]["t1"]["attempt"] == 1
    expected = {n.removesuffix(".in") + ".out": md5(d) for n, d in objects.items()}
    assert set(list_all(c, "rdst")) == set(expected)
    assert get_all(c, "rdst", list(expected)) == expected
    assert tmp_files(c) == []
