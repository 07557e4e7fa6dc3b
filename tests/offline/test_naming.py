"""The pure half of offline jobs: request parsing, the naming rule, aggregation."""

from __future__ import annotations

import pytest

from aisetl.model.errors import InvalidRequest
from aisetl.model.xaction import (
    Job,
    Naming,
    Progress,
    aggregate,
    parse_etlbck,
    percent,
)


@pytest.mark.parametrize(("value", "src", "new"), [
    ({}, "a/b.in", "a/b.in"),
    ({"ext": "out"}, "x.in", "x.out"),
    ({"ext": ".out"}, "x.in", "x.out"),
    ({"ext": "out"}, "a/b.tar.gz", "a/b.tar.out"),
    ({"ext": "out"}, "README", "README.out"),
    ({"ext": "out"}, "a/.cfg", "a/.cfg.out"),
    ({"ext": "out"}, "v1.2/data", "v1.2/data.out"),
    ({"ext": {"in": "out"}}, "x.in", "x.out"),
    ({"ext": {"in": "out"}}, "x.jpg", "x.jpg"),
    ({"ext": {"in": "out"}}, "x.in.bak", "x.in.bak"),
    ({"ext": {"gz": "z", "tar.gz": "tgz"}}, "a/b.tar.gz", "a/b.tgz"),
    ({"ext": {"": "txt"}}, "README", "README.txt"),
    ({"ext": {"in": ""}}, "x.in", "x"),
    ({"suffix": "-md5"}, "x.in", "x-md5.in"),
    ({"suffix": "-md5"}, "dir/README", "dir/README-md5"),
    ({"prefix": "md5/"}, "a/x.in", "md5/a/x.in"),
    ({"prefix": "t-"}, "a/x.in", "t-a/x.in"),
    ({"prefix": "p/", "suffix": "_s", "ext": "out"}, "a/b.tar.gz", "p/a/b.tar_s.out"),
])
def test_new_names_follow_the_documented_rule(value: dict[str, object], src: str,
                                              new: str) -> None:
    assert Naming.parse(value).new_name(src) == new


@pytest.mark.parametrize(("value", "field"), [
    ({"ext": "a/b"}, "value.ext"),
    ({"ext": 5}, "value.ext"),
    ({"ext": {"in": "a/b"}}, "value.ext"),
    ({"prefix": "/abs"}, "value.prefix"),
    ({"prefix": "../up"}, "value.prefix"),
    ({"prefix": "a//b"}, "value.prefix"),
    ({"suffix": "a/b"}, "value.suffix"),
    ({"dry_run": "maybe"}, "value.dry_run"),
])
def test_bad_fields_are_named(value: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_etlbck("src", {"action": "etlbck", "name": "dst", "value": value})
    assert e.value.context["field"] == field
    assert field in e.value.message


def test_destination_variants_of_aistore_3_3_and_3_4() -> None:
    assert parse_etlbck("s", {"name": "d"}).dst == "d"
    assert parse_etlbck("s", {"value": {"bck_to": {"name": "d", "provider": "ais"}}}).dst == "d"
    assert parse_etlbck("s", {"value": {"bck_to": "ais://d"}}).dst == "d"
    assert parse_etlbck("s", {}, bck_to_query="ais/@#/d").dst == "d"
    with pytest.raises(InvalidRequest, match="name"):
        parse_etlbck("s", {})
    with pytest.raises(InvalidRequest, match="is the source"):
        parse_etlbck("s", {"name": "s"})


def test_job_record_round_trips() -> None:
    req = parse_etlbck("s", {"name": "d", "value": {"id": "E", "ext": {"in": "out"},
                                                   "prefix": "p/", "dry_run": True}})
    job = Job.from_request("X1", req, ["t2", "t1"], 5.0)
    assert job.targets == ("t1", "t2")
    again = Job.from_record(job.to_record())
    assert again == job
    assert again.naming.new_name("a.in") == "p/a.out"


def test_aggregation_totals_and_states() -> None:
    job = Job.from_request("X1", parse_etlbck("s", {"name": "d", "value": {"id": "E"}}),
                           ["t1", "t2"], 1.0)
    p1 = Progress("t1", objects=5, bytes=50, total=5, started=2, ended=4, finished=True)
    p2 = Progress("t2", objects=3, bytes=30, total=6, started=3)
    for i in range(12):
        p2.add_error(f"o{i}", "boom")
    st = aggregate(job, {"t1": p1, "t2": p2})
    assert (st["state"], st["objects"], st["bytes"], st["errors"]) == ("running", 8, 80, 12)
    assert len(st["error_list"]) == 10 and st["error_list"][0]["target"] == "t2"
    assert st["started"] == 2 and st["ended"] == 0.0 and st["total"] == 11
    assert percent({"total": 8, "objects": 1, "errors": 1}) == 25.0
    assert percent({"total": 0, "objects": 0}) == 100.0
    p2.finished, p2.ended = True, 9
    st = aggregate(job, {"t1": p1, "t2": p2})
    assert (st["state"], st["finished"], st["ended"]) == ("failed", True, 9)
    p2.aborted, p2.reason = True, "stop"
    assert aggregate(job, {"t1": p1, "t2": p2})["state"] == "aborted"
    missing = aggregate(job, {"t1": p1, "t2": None}, {"t2": "gone"})
    assert missing["state"] == "running" and missing["targets"]["t2"]["note"] == "gone"
    assert missing["total"] is None and percent(missing) is None
