"""Bucket-to-bucket ETL jobs on a real 3-target cluster: results, names, dry run, errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from aisetl.model import placement
from tests.offline.conftest import N_OBJECTS, SEED_ETL
from tests.offline.helpers import (
    bucket_exists,
    get_all,
    job_status,
    list_all,
    md5,
    put_many,
    start_job,
    wait_job,
)
from tests.support.cluster import LocalCluster, http

SEED_MD5 = b"393c6706efb128fbc442d3f7d084a426"  # echo "some text :)" | md5sum


def sh(cmd: str, env: dict[str, str], cwd: Path | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)


def _on_disk(c: LocalCluster, bucket: str) -> dict[str, set[str]]:
    out = {}
    for t in c.smap():
        root = c.target_data(t["id"]) / "buckets" / bucket
        out[t["id"]] = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} \
            if root.exists() else set()
    return out


def test_rest_job_writes_every_result_once_with_its_new_name(
        oc: LocalCluster, many: dict[str, bytes]) -> None:
    status, xid = start_job(oc, "many", {"action": "etlbck", "name": "many-md5",
                                         "value": {"id": SEED_ETL, "ext": {"in": "md5"}}})
    assert status == 200, xid
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{9}", xid)
    st = wait_job(oc, xid)
    assert (st["state"], st["objects"], st["errors"], st["total"]) == \
        ("finished", N_OBJECTS, 0, N_OBJECTS)
    assert st["bytes"] == 32 * N_OBJECTS
    assert st["started"] <= st["ended"] and set(st["targets"]) == {"t1", "t2", "t3"}
    assert all(t["objects"] > 0 for t in st["targets"].values()), "work spread over targets"

    expected = {n.removesuffix(".in") + ".md5": md5(d) for n, d in many.items()}
    listed = list_all(oc, "many-md5")  # raises on a name listed twice
    assert set(listed) == set(expected)
    assert get_all(oc, "many-md5", list(expected)) == expected
    # each result sits on the HRW owner of its new name, and only there
    disk = _on_disk(oc, "many-md5")
    ids = [t["id"] for t in oc.smap()]
    for name in expected:
        owner = placement.owner(placement.object_key("many-md5", name), ids)
        assert [t for t, names in disk.items() if name in names] == [owner]

    metrics = 0.0
    for t in oc.smap():
        text = http("GET", t["url"] + "/metrics")[1].decode()
        m = re.search(r'^aisetl_xaction_objects_total\{kind="etlbck"\} (\S+)$', text, re.M)
        assert m, "xaction metrics exported"
        metrics += float(m.group(1))
    assert metrics >= N_OBJECTS


def test_cli_job_with_prefix_suffix_ext_and_wait(oc: LocalCluster, many: dict[str, bytes],
                                                 oc_env: dict[str, str]) -> None:
    r = sh(f"ais etl bucket {SEED_ETL} ais://many many-cli --prefix md5/ --suffix=-h "
           "--ext out --wait", oc_env)
    assert r.returncode == 0, r.stderr
    xid = r.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9]{10}", xid), r.stdout
    assert f"xaction {xid} finished: {N_OBJECTS} objects" in r.stderr
    expected = {"md5/" + n.removesuffix(".in") + "-h.out": md5(d) for n, d in many.items()}
    assert set(list_all(oc, "many-cli")) == set(expected)
    assert get_all(oc, "many-cli", list(expected)) == expected
    assert sh(f"ais wait xaction {xid}", oc_env).returncode == 0  # done is done


def test_seed_lines_verbatim(oc_env: dict[str, str], tmp_path: Path) -> None:
    script = f"""
set -e
ais create bucket transform
echo "some text :)" | ais put - transform/shard.in
XACT_ID=$(ais etl bucket {SEED_ETL} transform transform-md5)
ais wait xaction $XACT_ID
ais get transform-md5/shard.in out.txt
"""
    r = sh(script, oc_env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out.txt").read_bytes() == SEED_MD5


def test_dry_run_counts_exact_objects_and_bytes_and_writes_nothing(
        oc: LocalCluster, many: dict[str, bytes]) -> None:
    before = {t: sorted((oc.target_data(t) / "buckets").iterdir()) for t in ("t1", "t2", "t3")}
    status, xid = start_job(oc, "many", {"action": "etlbck", "name": "never-made",
                                         "value": {"id": SEED_ETL, "ext": "destext",
                                                   "dry_run": True}})
    assert status == 200, xid
    st = wait_job(oc, xid)
    assert (st["state"], st["objects"], st["bytes"], st["errors"], st["dry_run"]) == \
        ("finished", N_OBJECTS, 32 * N_OBJECTS, 0, True)
    assert not bucket_exists(oc, "never-made")
    after = {t: sorted((oc.target_data(t) / "buckets").iterdir()) for t in ("t1", "t2", "t3")}
    assert after == before


def test_ext_map_and_destination_variants_of_aistore(oc: LocalCluster) -> None:
    objects = {"a/b.tar.gz": b"1", "x.in": b"22", "README": b"333", "dir/.cfg": b"4444",
               "pic.jpg": b"55555"}
    put_many(oc, "names", objects)
    cases = [
        # (message, query, destination, expected names)
        ({"action": "etlbck", "value": {"id": SEED_ETL, "bck_to": {"name": "names-a",
                                                                    "provider": "ais"},
                                        "ext": {"tar.gz": "tgz", "in": "out"}}}, "",
         "names-a", {"a/b.tgz", "x.out", "README", "dir/.cfg", "pic.jpg"}),
        ({"action": "etlbck", "value": {"id": SEED_ETL, "ext": "txt", "prefix": "p/",
                                        "suffix": "-s"}}, "?bck_to=ais%2F%40%23%2Fnames-b",
         "names-b", {"p/a/b.tar-s.txt", "p/x-s.txt", "p/README-s.txt", "p/dir/.cfg-s.txt",
                     "p/pic-s.txt"}),
    ]
    for msg, query, dst, names in cases:
        status, xid = start_job(oc, "names", msg, query)
        assert status == 200, xid
        assert wait_job(oc, xid)["state"] == "finished"
        assert set(list_all(oc, dst)) == names


@pytest.mark.parametrize(("src", "msg", "status", "words"), [
    ("many", {"action": "etlbck", "name": "d", "value": {}}, 404, ["value.id"]),
    ("many", {"action": "etlbck", "name": "d", "value": {"id": "NoSuchEtl"}}, 404,
     ["NoSuchEtl"]),
    ("no-such-bucket", {"action": "etlbck", "name": "d", "value": {"id": SEED_ETL}}, 404,
     ["no-such-bucket"]),
    ("many", {"action": "etlbck", "name": "many", "value": {"id": SEED_ETL}}, 400,
     ["source"]),
    ("many", {"action": "etlbck", "name": "d", "value": {"id": SEED_ETL, "ext": "a/b"}}, 400,
     ["value.ext"]),
    ("many", {"action": "etlbck", "name": "d", "value": {"id": SEED_ETL, "ext": {"in": 3}}},
     400, ["value.ext"]),
    ("many", {"action": "etlbck", "name": "d", "value": {"id": SEED_ETL, "prefix": "/x"}},
     400, ["value.prefix"]),
    ("many", {"action": "etlbck", "value": {"id": SEED_ETL}}, 400, ["name"]),
])
def test_bad_requests_are_refused_naming_what_is_wrong(
        oc: LocalCluster, many: dict[str, bytes], src: str, msg: dict[str, object],
        status: int, words: list[str]) -> None:
    got, body = start_job(oc, src, msg)
    assert got == status, body
    message = json.loads(body)["message"]
    for w in words:
        assert w in message
    assert not bucket_exists(oc, "d")


def test_unknown_xaction_is_404_in_api_and_cli(oc: LocalCluster,
                                               oc_env: dict[str, str]) -> None:
    assert http("GET", f"{oc.endpoint}/v1/xactions/Nope123456")[0] == 404
    assert http("DELETE", f"{oc.endpoint}/v1/xactions/Nope123456")[0] == 404
    r = sh("ais wait xaction Nope123456", oc_env)
    assert r.returncode == 1 and "Nope123456" in r.stderr and len(r.stderr.splitlines()) == 1


def test_job_list_shows_recorded_jobs(oc: LocalCluster, many: dict[str, bytes]) -> None:
    status, xid = start_job(oc, "many", {"action": "etlbck", "name": "x",
                                         "value": {"id": SEED_ETL, "dry_run": True}})
    assert status == 200
    wait_job(oc, xid)
    jobs = json.loads(http("GET", f"{oc.endpoint}/v1/xactions")[1])
    assert xid in [j["id"] for j in jobs]
    assert job_status(oc, xid)["targets"]["t1"]["attempt"] == 1
