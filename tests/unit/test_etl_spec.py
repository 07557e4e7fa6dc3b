"""Parsing and validating ETL declarations (pure model layer)."""

import base64

import pytest

from aisetl.model.durations import format_duration, parse_duration
from aisetl.model.errors import InvalidSpec
from aisetl.model.etl import (
    from_document,
    new_etl_id,
    parse_build,
    parse_init,
    to_document,
)
from aisetl.model.reconcile import (
    FAILED,
    INITIALIZING,
    READY,
    Action,
    EtlStatus,
    overall,
    plan,
)

SEED_SPEC = """\
apiVersion: v1
kind: Pod
metadata:
  name: transformer-md5
  annotations:
    communication_type: hpush://
    wait_timeout: 2m
spec:
  containers:
    - name: server
      image: quay.io/user/md5_server:v1
      ports:
        - name: default
          containerPort: 80
      command: ['/code/server.py', '--listen', '0.0.0.0', '--port', '80']
"""

SEED_CODE = """\
import hashlib

def transform(input_bytes):
    md5 = hashlib.md5()
    md5.update(input_bytes)
    return md5.hexdigest().encode()
"""


def test_seed_spec_parses() -> None:
    d = parse_init(SEED_SPEC)
    assert d.kind == "init" and d.comm_type == "hpush://" and d.wait_timeout == "2m"
    c = d.container
    assert (c.image, c.port, c.command) == ("quay.io/user/md5_server:v1", 80,
                                            ["/code/server.py", "--listen", "0.0.0.0",
                                             "--port", "80"])
    assert d.name == "transformer-md5"


def test_generated_ids_look_like_the_seeds() -> None:
    ids = {new_etl_id() for _ in range(50)}
    assert len(ids) == 50
    for i in ids:
        assert len(i) == 10 and i.isalnum() and i[0].isalpha()


def test_build_accepts_base64_and_plain_text_alike() -> None:
    b64 = base64.b64encode(SEED_CODE.encode()).decode()
    deps_b64 = base64.b64encode(b"numpy\nPillow==10.0\n").decode()
    a = parse_build({"code": b64, "dependencies": deps_b64, "runtime": "python3"})
    b = parse_build({"code": SEED_CODE, "dependencies": "numpy\nPillow==10.0\n",
                     "runtime": "python3"})
    assert a.code == b.code == SEED_CODE
    assert a.deps == b.deps == "numpy\nPillow==10.0\n"
    # short plain requirement names are not mistaken for base64
    assert parse_build({"code": SEED_CODE, "dependencies": "torch", "runtime": "python3"}
                       ).deps == "torch"


def test_document_round_trip_keeps_everything() -> None:
    for d in (parse_init(SEED_SPEC, etl_id="md5-a"),
              parse_build({"code": SEED_CODE, "runtime": "python2", "id": "Md5_b",
                           "communication_type": "hrev://", "wait_timeout": "1m30s"})):
        doc = to_document(d)
        assert doc["metadata"]["name"].startswith("aisetl-etl-")
        assert doc["metadata"]["name"] == doc["metadata"]["name"].lower()
        assert doc["metadata"]["labels"]["aisetl.io/etl"] == "true"
        back = from_document(doc)
        assert (back.id, back.kind, back.comm_type, back.wait_timeout, back.code, back.spec) \
            == (d.id, d.kind, d.comm_type, d.wait_timeout, d.code, d.spec)


@pytest.mark.parametrize("spec,field", [
    (SEED_SPEC.replace("    - name: server", "    - name: a\n      image: x\n"
                       "      ports: [{containerPort: 1}]\n    - name: server"),
     "spec.containers"),
    (SEED_SPEC.replace("      ports:\n        - name: default\n          containerPort: 80\n",
                       ""), "spec.containers[0].ports"),
    (SEED_SPEC.replace("hpush://", "grpc://"), "communication_type"),
    (SEED_SPEC.replace("wait_timeout: 2m", "wait_timeout: two minutes"), "wait_timeout"),
    (SEED_SPEC.replace("kind: Pod", "kind: Deployment"), "kind"),
    ("spec: [unclosed", "spec"),
    ("", "spec"),
    (SEED_SPEC.replace("containerPort: 80", "containerPort: 99999"), "containerPort"),
])
def test_bad_init_specs_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_init(spec)
    assert field in e.value.message
    assert e.value.status == 400


@pytest.mark.parametrize("body,field", [
    ({"code": SEED_CODE, "runtime": "python4"}, "runtime"),
    ({"code": "def transform(x):\n  return x +\n", "runtime": "python3"}, "syntax error"),
    ({"code": "x = 1\n", "runtime": "python3"}, "no top-level 'transform'"),
    ({"code": "", "runtime": "python3"}, "code: empty"),
    ({"code": SEED_CODE, "runtime": "python3", "communication_type": "ws://"},
     "communication_type"),
    ({"code": SEED_CODE, "runtime": "python3", "wait_timeout": "soon"}, "wait_timeout"),
    ({"code": SEED_CODE, "runtime": "python3", "id": "has space"}, "id"),
    ({"code": SEED_CODE, "runtime": "python3", "id": "list"}, "reserved"),
    ({"code": SEED_CODE, "runtime": "python3", "colour": "red"}, "colour: unknown field"),
    ({"code": SEED_CODE, "runtime": "python3", "dependencies": "--index-url=x y"},
     "pip options"),
    ("not an object", "body"),
])
def test_bad_build_requests_name_the_field(body: object, field: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_build(body)
    assert field in e.value.message


@pytest.mark.parametrize("text,seconds", [("2m", 120), ("30s", 30), ("1m30s", 90),
                                          ("500ms", 0.5), ("1.5h", 5400), ("1h2m3s", 3723)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_format_duration() -> None:
    assert format_duration(90) == "1m30s" and format_duration(0.25) == "250ms"


def test_plan_starts_stops_and_replaces() -> None:
    assert plan({"a": "1", "b": "2"}, {"b": "2", "c": "3"}) == [Action("stop", "c"),
                                                              Action("start", "a")]
    assert plan({"a": "new"}, {"a": "old"}) == [Action("stop", "a"), Action("start", "a")]
    assert plan({"a": "1"}, {"a": "1"}) == []


def test_overall_state() -> None:
    r, i, f = EtlStatus(READY), EtlStatus(INITIALIZING), EtlStatus(FAILED, "boom")
    assert overall({"t1": r, "t2": r}, ["t1", "t2"]) == (READY, [])
    assert overall({"t1": r}, ["t1", "t2"])[0] == INITIALIZING
    assert overall({"t1": r, "t2": i}, ["t1", "t2"])[0] == INITIALIZING
    assert overall({"t1": r, "t2": f}, ["t1", "t2"]) == (FAILED, ["target t2: boom"])


def test_env_names_that_cannot_be_environment_variables_are_refused() -> None:
    spec = SEED_SPEC.replace("      command:",
                             "      env: [{name: 'A=B', value: x}]\n      command:")
    with pytest.raises(InvalidSpec) as e:
        parse_init(spec)
    assert "spec.containers[0].env[0].name" in e.value.message
