"""Offline jobs through batches: small objects go to the transformer many per request, and
their results to each owner target in one multi-object PUT; big ones stay per object.

The python3 runtime advertises ``POST /batch``; the transforms below note which path
called them (a line per call in a file next to the test), so a test can tell that
both paths ran in one job.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import struct
import subprocess
import time
import urllib.parse
import zlib
from pathlib import Path

import pytest

from aisetl.model import placement
from tests.offline.conftest import payload
from tests.offline.helpers import (
    bucket_exists,
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
from tests.offline.test_failures import runtime_of
from tests.support.cluster import LocalCluster, http, wait_until
from tests.support.prereq import require

MiB = 1 << 20
REQ = struct.Struct(">HQ")

# Reverses each object (so a result is never its source), fails on b"bad...",
# turns b"grow..." into a result of more than 3 MiB, and logs "<input size> <path>"
# per call: "batch" when the runtime's batch endpoint called it.
MIXED_CODE = """\
import os, sys

def transform(input_bytes):
    caller = sys._getframe(1).f_code.co_name
    line = "%d %s\\n" % (len(input_bytes), "batch" if caller == "transform_one" else "single")
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
    if input_bytes.startswith(b"bad"):
        raise ValueError("refusing a bad object")
    if input_bytes.startswith(b"grow"):
        return input_bytes * ((3 << 20) // len(input_bytes) + 1)
    return input_bytes[::-1]
"""

SLOW_CODE = """\
import hashlib, time

def transform(input_bytes):
    time.sleep(0.01)
    if input_bytes.startswith(b"bad"):
        raise ValueError("refusing a bad object")
    return hashlib.md5(input_bytes).hexdigest().encode()
"""


def mixed_result(data: bytes) -> bytes:
    if data.startswith(b"grow"):
        return data * ((3 << 20) // len(data) + 1)
    return data[::-1]


def mixed_objects() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(good, bad): many small objects, some near and above the 1 MiB threshold."""
    good = {f"m/small-{i:04d}": payload(i) for i in range(700)}
    good.update({f"m/mid-{i}": bytes([i]) * (200_000 + 150_000 * i) for i in range(5)})
    good["m/at-threshold"] = b"t" * MiB  # batched (<= 1 MiB)
    good["m/above-threshold"] = b"u" * (MiB + 1)  # per object
    good["m/big"] = b"v" * (5 * MiB // 2)  # per object
    good.update({f"m/grow-{i}": b"grow %d" % i for i in range(4)})  # small in, > 1 MiB out
    good["m/empty"] = b""
    bad = {f"m/bad-{i}": b"bad object %d" % i for i in range(9)}
    return good, bad


def calls(path: Path) -> list[tuple[int, str]]:
    return [(int(n), how) for n, how in (line.split() for line in path.read_text().split("\n")
                                         if line)]


def batch_puts(c: LocalCluster) -> float:
    """Multi-object PUTs that targets have served (their Prometheus counters)."""
    total = 0.0
    for t in c.smap():
        text = http("GET", t["url"] + "/metrics")[1].decode()
        for m in re.finditer(r'^aisetl_http_requests_total\{(.*)\} (\S+)$', text, re.M):
            if "/v1/batch/objects/" in m.group(1) and 'status="200"' in m.group(1):
                total += float(m.group(2))
    return total


def owners(c: LocalCluster, bucket: str, names: list[str]) -> dict[str, str]:
    ids = [t["id"] for t in c.smap()]
    return {n: placement.owner(placement.object_key(bucket, n), ids) for n in names}


def test_mixed_sizes_take_both_paths_in_one_job_and_every_result_is_right(
        oc: LocalCluster, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    build(oc, f"CALLS = {str(log)!r}\n" + MIXED_CODE, "mixed")
    good, bad = mixed_objects()
    put_many(oc, "mixsrc", {**good, **bad})
    puts_before = batch_puts(oc)
    status, xid = start_job(oc, "mixsrc", {"action": "etlbck", "name": "mixdst",
                                           "value": {"id": "mixed", "ext": "r"}})
    assert status == 200, xid
    st = wait_job(oc, xid, timeout=120)
    assert (st["state"], st["objects"], st["errors"]) == ("failed", len(good), len(bad)), st
    assert st["bytes"] == sum(len(mixed_result(d)) for d in good.values())
    for e in st["error_list"]:
        assert e["object"] in bad and "refusing a bad object" in e["reason"], e

    expected = {n + ".r": mixed_result(d) for n, d in good.items()}
    assert set(list_all(oc, "mixdst")) == set(expected)
    assert get_all(oc, "mixdst", list(expected)) == expected
    for name, owner in owners(oc, "mixdst", list(expected)).items():
        assert (oc.target_data(owner) / "buckets" / "mixdst" / name).is_file(), name
    assert tmp_files(oc) == []

    # both paths ran: every object up to 1 MiB through the batch endpoint, bigger ones
    # one per request (a retry after a transient error would add calls, not change paths)
    seen = calls(log)
    assert len(seen) >= len(good) + len(bad)
    assert {n for n, _ in seen} == {len(d) for d in {**good, **bad}.values()}
    assert {how for n, how in seen if n <= MiB} == {"batch"}
    assert {how for n, how in seen if n > MiB} == {"single"}
    assert batch_puts(oc) > puts_before, "results went to their owners in multi-object PUTs"
    stop_etl(oc, "mixed")


def test_dry_run_through_batches_counts_exactly_and_writes_nothing(
        oc: LocalCluster, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    build(oc, f"CALLS = {str(log)!r}\n" + MIXED_CODE, "mixeddry")
    good, _ = mixed_objects()
    put_many(oc, "mixdrysrc", good)
    status, xid = start_job(oc, "mixdrysrc", {"action": "etlbck", "name": "mixdry-never",
                                              "value": {"id": "mixeddry", "dry_run": True}})
    assert status == 200, xid
    st = wait_job(oc, xid, timeout=120)
    assert (st["state"], st["objects"], st["errors"]) == ("finished", len(good), 0), st
    assert st["bytes"] == sum(len(mixed_result(d)) for d in good.values())
    assert not bucket_exists(oc, "mixdry-never")
    assert "batch" in {how for _, how in calls(log)}
    stop_etl(oc, "mixeddry")


def test_stop_on_error_inside_a_batch_aborts_at_the_first_failure(oc: LocalCluster) -> None:
    build(oc, SLOW_CODE, "slowbad")
    objects = {f"z-good-{i:04d}": payload(i) for i in range(900)}
    bad = {f"a-bad-{i}": b"bad" for i in range(6)}  # sort first on every target
    put_many(oc, "soesrc", {**objects, **bad})
    status, xid = start_job(oc, "soesrc", {"action": "etlbck", "name": "soedst",
                                           "value": {"id": "slowbad", "stop_on_error": True}})
    assert status == 200, xid
    st = wait_job(oc, xid)
    assert st["state"] == "aborted" and st["errors"] >= 1, st
    assert "stop_on_error" in st["abort_reason"] and "a-bad-" in st["abort_reason"]
    assert st["objects"] < len(objects)
    for e in st["error_list"]:
        assert e["object"] in bad and "refusing a bad object" in e["reason"], e
    # whatever was written is whole
    listed = list_all(oc, "soedst")
    assert get_all(oc, "soedst", list(listed)) == {n: md5(objects[n]) for n in listed}
    wait_until(lambda: tmp_files(oc) == [], 10, "no temporary file left")
    stop_etl(oc, "slowbad")


def test_abort_mid_batch_leaves_only_whole_results(oc: LocalCluster) -> None:
    build(oc, SLOW_CODE, "slowabort")
    objects = {f"ab{i:05d}": payload(i) for i in range(3000)}
    put_many(oc, "babortsrc", objects)
    puts_before = batch_puts(oc)
    status, xid = start_job(oc, "babortsrc", {"action": "etlbck", "name": "babortdst",
                                              "value": {"id": "slowabort"}})
    assert status == 200, xid
    wait_progress(oc, xid, 200)
    status, body, _ = http("DELETE", f"{oc.endpoint}/v1/xactions/{xid}", timeout=60)
    assert status == 200, body
    st = job_status(oc, xid)
    assert (st["state"], st["finished"], st["aborted"]) == ("aborted", True, True)
    assert 200 <= st["objects"] < len(objects)
    assert batch_puts(oc) > puts_before, "the batch path ran"

    wait_until(lambda: tmp_files(oc) == [], 10, "no upload in flight left behind")
    listed = list_all(oc, "babortdst")
    assert st["objects"] <= len(listed) < len(objects)
    got = get_all(oc, "babortdst", list(listed))
    assert got == {n: md5(objects[n]) for n in listed}, "every visible object is whole"
    stop_etl(oc, "slowabort")


def test_transformer_killed_mid_batch_loses_no_object(
        oc: LocalCluster) -> None:
    build(oc, SLOW_CODE, "bkill")
    objects = {f"bk{i:05d}.in": payload(i) for i in range(1500)}
    put_many(oc, "bkillsrc", objects)
    status, xid = start_job(oc, "bkillsrc", {"action": "etlbck", "name": "bkilldst",
                                             "value": {"id": "bkill"}})
    assert status == 200, xid
    wait_progress(oc, xid, 150)
    victims = [runtime_of(oc, t, "bkill") for t in ("t1", "t2", "t3")]
    for v in victims:
        v.send_signal(signal.SIGKILL)
    st = wait_job(oc, xid, timeout=120)
    assert (st["state"], st["objects"], st["errors"]) == ("finished", len(objects), 0), st
    assert runtime_of(oc, "t1", "bkill").pid != victims[0].pid, "the transformer restarted"
    expected = {n: md5(d) for n, d in objects.items()}
    assert set(list_all(oc, "bkilldst")) == set(expected)
    assert get_all(oc, "bkilldst", list(expected)) == expected
    assert tmp_files(oc) == []
    stop_etl(oc, "bkill")


# --- the owner's multi-object PUT ----------------------------------------------------------
def frame(name: bytes, data: bytes, size: int | None = None) -> bytes:
    return REQ.pack(len(name), len(data) if size is None else size) + name + data


def batch_put(c: LocalCluster, target: str, bucket: str, body: bytes
              ) -> tuple[int, dict[str, object]]:
    url = next(t["url"] for t in c.smap() if t["id"] == target)
    status, text, _ = http("PUT", f"{url}/v1/batch/objects/{urllib.parse.quote(bucket)}", body,
                           {"Content-Type": "application/octet-stream"})
    return status, json.loads(text)


def test_multi_object_put_writes_each_object_and_answers_each(oc: LocalCluster) -> None:
    put_many(oc, "mput", {"seed": b"x"})
    body = (frame(b"a/one", b"first") + frame(b"a/empty", b"") + frame(b"../up", b"no")
            + frame(b"a/one/under", b"'a/one' is an object") + frame(b"b", b"\0" * MiB))
    status, doc = batch_put(oc, "t1", "mput", body)
    assert status == 200, doc
    results = doc["results"]
    assert isinstance(results, list)
    assert [r["name"] for r in results] == ["a/one", "a/empty", "../up", "a/one/under", "b"]
    assert results[0]["size"] == 5 and results[1]["size"] == 0 and results[4]["size"] == MiB
    assert results[2]["status"] == 400 and "size" not in results[2]
    assert results[3]["status"] == 409 and "clashes" in results[3]["message"]
    root = oc.target_data("t1") / "buckets" / "mput"
    assert (root / "a" / "one").read_bytes() == b"first"
    assert (root / "a" / "empty").read_bytes() == b""
    assert (root / "b").read_bytes() == b"\0" * MiB
    t1 = next(t["url"] for t in oc.smap() if t["id"] == "t1")
    status, _, headers = http("HEAD", f"{t1}/v1/objects/mput/a/one")
    assert status == 200 and headers.get("X-Ais-Checksum-Value") == f"{zlib.crc32(b'first'):08x}"
    assert tmp_files(oc) == []


@pytest.mark.parametrize(("body", "why"), [
    (b"\0\0\0", "body ends inside a frame header"),
    (frame(b"", b"x"), "name length 0"),
    (REQ.pack(5000, 1) + b"x", "name length 5000"),
    (frame(b"big", b"", size=(1 << 20) + 1), "larger than 1048576"),  # refused unread
    (frame(b"ok", b"fine") + frame(b"cut", b"abc", size=10), "body ends inside the frame"),
    (frame(b"\xff\xfe", b"x"), "name is not UTF-8"),
])
def test_malformed_framing_is_a_400_and_installs_nothing(
        oc: LocalCluster, body: bytes, why: str) -> None:
    put_many(oc, "mbad", {"seed": b"x"})
    before = list_all(oc, "mbad")
    status, doc = batch_put(oc, "t2", "mbad", body)
    assert status == 400, doc
    assert doc["error"] == "FramingError" and why in str(doc["message"]), doc
    assert list_all(oc, "mbad") == before, "not even the well-formed frames are installed"
    assert tmp_files(oc) == []


def test_multi_object_put_into_a_missing_bucket_is_a_404(oc: LocalCluster) -> None:
    status, doc = batch_put(oc, "t3", "no-such-bucket", frame(b"a", b"x"))
    assert status == 404 and doc["error"] == "BucketNotFound", doc


# --- init-spec ETLs (user containers): always per object -----------------------------------
SPEC = Path(__file__).parent.parent / "fixtures" / "md5_server" / "spec.yaml"


@pytest.mark.container
def test_init_spec_etl_jobs_run_per_object(oc: LocalCluster) -> None:
    require(shutil.which("podman") is not None, "podman", "bash hack/container-setup.sh")
    ok = subprocess.run(["podman", "image", "exists", "quay.io/user/md5_server:v1"],
                        capture_output=True).returncode == 0
    require(ok, "image quay.io/user/md5_server:v1", "bash hack/build-seed-image.sh")
    status, body, _ = http("POST", f"{oc.endpoint}/v1/etl/init?name=seedinit",
                           SPEC.read_bytes(), timeout=180)
    assert status == 200, body
    etl_id = body.decode().strip()
    objects = {f"i{i:03d}": payload(i) for i in range(150)}
    put_many(oc, "initsrc", objects)
    puts_before = batch_puts(oc)
    t0 = time.monotonic()
    status, xid = start_job(oc, "initsrc", {"action": "etlbck", "name": "initdst",
                                            "value": {"id": etl_id}})
    assert status == 200, xid
    st = wait_job(oc, xid, timeout=120)
    assert (st["state"], st["objects"], st["errors"]) == ("finished", len(objects), 0), \
        (st, time.monotonic() - t0)
    expected = {n: md5(d) for n, d in objects.items()}
    assert get_all(oc, "initdst", list(expected)) == expected
    assert batch_puts(oc) == puts_before, "no batch: the container does not advertise one"
    stop_etl(oc, etl_id)
