"""Transformers on a real cluster: every communication type and runtime, failures,
restarts, timeouts, bad specs, dependencies, and memory under a 1 GiB stream."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.etl.conftest import WHEELHOUSE
from tests.etl.helpers import (
    IDENTITY_STREAM_CODE,
    MD5_CODE,
    build,
    etl_status,
    put,
    stop,
    transform_get,
)
from tests.support.cluster import LocalCluster, http, wait_until
from tests.support.memory import RssSampler
from tests.support.prereq import require


def transformer_pids(c: LocalCluster, etl_id: str) -> list[psutil.Process]:
    """The runtime server processes (parents) of one ETL, one per target."""
    out = []
    for p in c.processes():
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if any(a.endswith("server.py") for a in cmd) and any(etl_id in a for a in cmd) \
                and "--worker-fd" not in cmd:
            out.append(p)
    return out


@pytest.mark.parametrize("runtime", ["python3", "python2"])
@pytest.mark.parametrize("comm", ["hpush://", "hrev://", "hpull://"])
def test_each_communication_type_with_each_runtime(etl_cluster: LocalCluster, runtime: str,
                                                   comm: str) -> None:
    status, etl_id = build(etl_cluster, MD5_CODE, runtime=runtime, communication_type=comm)
    assert status == 200, etl_id
    etl_id = etl_id.strip()
    try:
        objs = {f"dir/obj {i}": os.urandom(1000 * (i + 1)) for i in range(12)}
        for name, data in objs.items():
            put(etl_cluster, "comm", name, data)
        for name, data in objs.items():
            assert transform_get(etl_cluster, "comm", name, etl_id) == (
                200, hashlib.md5(data).hexdigest().encode())
        missing = transform_get(etl_cluster, "comm", "no/such", etl_id)
        assert missing[0] == 404
    finally:
        stop(etl_cluster, etl_id)


def test_transform_that_raises_is_a_500_with_the_message_and_keeps_serving(
        etl_cluster: LocalCluster) -> None:
    code = ("def transform(b):\n"
            "    if b.startswith(b'bad'):\n"
            "        raise ValueError('cannot transform ' + b.decode())\n"
            "    return b.upper()\n")
    status, etl_id = build(etl_cluster, code)
    etl_id = etl_id.strip()
    try:
        put(etl_cluster, "raise", "bad", b"bad input")
        put(etl_cluster, "raise", "good", b"good input")
        status, body = transform_get(etl_cluster, "raise", "bad", etl_id)
        assert status == 500
        assert "ValueError: cannot transform bad input" in json.loads(body)["message"]
        assert transform_get(etl_cluster, "raise", "good", etl_id) == (200, b"GOOD INPUT")
        st = etl_status(etl_cluster, etl_id)
        assert all(t["restarts"] == 0 for t in st["targets"].values())  # type: ignore[union-attr]
    finally:
        stop(etl_cluster, etl_id)


def test_transformer_killed_mid_stream_errors_then_recovers(etl_cluster: LocalCluster) -> None:
    code = ("import time\n"
            "async def transform_stream(chunks):\n"
            "    async for c in chunks:\n"
            "        time.sleep(0.01)\n"
            "        yield c\n")
    status, etl_id = build(etl_cluster, code, id="killme")
    assert status == 200, etl_id
    try:
        data = os.urandom(64 << 20)
        put(etl_cluster, "kill", "big", data)
        started = threading.Event()
        result: dict[str, object] = {}

        def fetch() -> None:
            """Stream the transformed object; say when the first bytes arrived."""
            import http.client as httpc
            import urllib.parse as up

            _, _, hdrs = http("GET", f"{etl_cluster.endpoint}/v1/objects/kill/big?uuid=killme")
            u = up.urlsplit(hdrs["Location"])
            conn = httpc.HTTPConnection(u.netloc, timeout=60)
            try:
                conn.request("GET", f"{u.path}?{u.query}")
                resp = conn.getresponse()
                got = resp.read(1 << 20)
                started.set()
                while chunk := resp.read(1 << 20):
                    got += chunk
                result["r"] = (resp.status, len(got))
            except Exception as e:  # the connection is cut: the error the client must see
                result["r"] = e
            finally:
                started.set()
                conn.close()

        th = threading.Thread(target=fetch)
        th.start()
        assert started.wait(60), "the transformed stream never started"
        for p in transformer_pids(etl_cluster, "killme"):
            for child in p.children(recursive=True):
                child.kill()
            p.kill()
        th.join(60)
        r = result["r"]
        assert isinstance(r, Exception) or r != (200, len(data)), \
            f"a killed transformer must not look like a success: {r}"

        def ready_again() -> bool:
            st = etl_status(etl_cluster, "killme")
            return st["state"] == "Ready" and any(
                t["restarts"] >= 1 for t in st["targets"].values())  # type: ignore[union-attr]

        wait_until(ready_again, 60, "the transformer to be restarted")
        put(etl_cluster, "kill", "small", b"after the restart")
        assert transform_get(etl_cluster, "kill", "small", "killme") == (200,
                                                                         b"after the restart")
        metrics = http("GET", etl_cluster.endpoint + "/metrics")[1]
        assert metrics  # the gateway serves metrics; restarts are counted on targets:
        restarts = sum(
            float(m.group(1)) for t in etl_cluster.smap()
            for m in re.finditer(rb'aisetl_etl_transformer_restarts_total\{etl="killme"\} (\S+)',
                                 http("GET", t["url"] + "/metrics")[1]))
        assert restarts >= 1
    finally:
        stop(etl_cluster, "killme")


def test_wait_timeout_exceeded_fails_and_leaves_nothing_running(
        etl_cluster: LocalCluster) -> None:
    code = "import time\ntime.sleep(60)\ndef transform(b):\n    return b\n"
    t0 = time.monotonic()
    status, body = build(etl_cluster, code, id="slowstart", wait_timeout="2s")
    assert status == 504, body
    assert "not ready within 2s" in body and "target t" in body
    assert time.monotonic() - t0 < 30
    wait_until(lambda: not transformer_pids(etl_cluster, "slowstart"), 15,
               "every transformer process to be gone")
    listing = json.loads(http("GET", etl_cluster.endpoint + "/v1/etl/list")[1])
    assert "slowstart" not in [e["id"] for e in listing]


@pytest.mark.parametrize("body,fragment", [
    ({"code": MD5_CODE, "runtime": "python3", "communication_type": "ws://"},
     "unknown communication type"),
    ({"code": MD5_CODE, "runtime": "python3", "wait_timeout": "2 minutes"},
     "wait_timeout"),
    ({"code": "def transform(b:\n", "runtime": "python3"}, "syntax error"),
    ({"code": MD5_CODE, "runtime": "cobol"}, "runtime"),
    ({"code": MD5_CODE, "runtime": "python3",
      "dependencies": "surely-not-a-package-aisetl==9.9.9"}, "dependencies failed to install"),
])
def test_bad_build_requests_are_clear_4xx(etl_cluster: LocalCluster, body: dict[str, str],
                                          fragment: str) -> None:
    status, out, _ = http("POST", etl_cluster.endpoint + "/v1/etl/build",
                          json.dumps(body).encode(), timeout=120)
    assert 400 <= status < 500, (status, out)
    assert fragment in json.loads(out)["message"]
    listing = json.loads(http("GET", etl_cluster.endpoint + "/v1/etl/list")[1])
    assert listing == [] or all(e["state"] == "Ready" for e in listing)


@pytest.mark.parametrize("spec,fragment", [
    ("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - {name: a, image: x, ports: "
     "[{containerPort: 1}]}\n  - {name: b, image: y, ports: [{containerPort: 2}]}\n",
     "has 2 containers"),
    ("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - {name: a, image: x}\n",
     "no containerPort"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {annotations: {communication_type: 'x://'}}\n"
     "spec:\n  containers:\n  - {name: a, image: x, ports: [{containerPort: 1}]}\n",
     "unknown communication type"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {annotations: {wait_timeout: 'forever'}}\n"
     "spec:\n  containers:\n  - {name: a, image: x, ports: [{containerPort: 1}]}\n",
     "is not a duration"),
    ("kind: Pod\nspec: {containers: [\n", "not valid YAML"),
])
def test_bad_init_specs_are_clear_4xx(etl_cluster: LocalCluster, spec: str,
                                      fragment: str) -> None:
    status, out, _ = http("POST", etl_cluster.endpoint + "/v1/etl/init", spec.encode())
    assert status == 400, out
    assert fragment in json.loads(out)["message"]


IMAGENET_CODE = """\
import io, tarfile
import numpy as np
from PIL import Image

def transform(input_bytes: bytes) -> bytes:
    input_tar = tarfile.open(fileobj=io.BytesIO(input_bytes))
    output_bytes = io.BytesIO()
    output_tar = tarfile.open(fileobj=output_bytes, mode="w|")
    for member in input_tar:
        image = Image.open(input_tar.extractfile(member)).convert("RGB")
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2,
                            (w + side) // 2, (h + side) // 2)).resize((224, 224))
        processed = np.asarray(image, dtype=np.uint8).tobytes()
        member.size = len(processed)
        output_tar.addfile(member, io.BytesIO(processed))
    output_tar.close()
    return output_bytes.getvalue()
"""

WHERE_CODE = "import PIL, numpy\ndef transform(b):\n    return (PIL.__file__ + '|' + " \
             "numpy.__file__).encode()\n"


def _jpeg_tar(n: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(n):
            w, h = 300 + 37 * i, 200 + 23 * i
            img = Image.effect_mandelbrot((w, h), (-2, -1.2, 1, 1.2), 60 + i).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            info = tarfile.TarInfo(f"n02085620_{1000 + i}.JPEG")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return out.getvalue()


def test_imagenet_preprocessing_with_dependencies(etl_cluster: LocalCluster,
                                                  tmp_path: Path) -> None:
    require(any(WHEELHOUSE.glob("pillow-*.whl")) and any(WHEELHOUSE.glob("numpy-*.whl")),
            f"Pillow and numpy wheels in {WHEELHOUSE}", "./hack/test.sh (it downloads them)")
    (tmp_path / "deps.txt").write_text("Pillow\nnumpy\n")
    status, etl_id = build(etl_cluster, IMAGENET_CODE, dependencies="Pillow\nnumpy\n",
                           id="imagenet", wait_timeout="3m")
    assert status == 200, etl_id
    status, where_id = build(etl_cluster, WHERE_CODE, dependencies="Pillow\nnumpy\n",
                             id="whereis")
    assert status == 200, where_id
    try:
        raw = _jpeg_tar(6)
        put(etl_cluster, "imagenet", "raw-train.tar", raw)
        status, out = transform_get(etl_cluster, "imagenet", "raw-train.tar", "imagenet")
        assert status == 200, out[:500]
        members = tarfile.open(fileobj=io.BytesIO(out)).getmembers()
        assert [m.name for m in members] == [f"n02085620_{1000 + i}.JPEG" for i in range(6)]
        assert all(m.size == 224 * 224 * 3 for m in members)
        # the dependencies came from the target's cache, not from this machine's Python
        status, where = transform_get(etl_cluster, "imagenet", "raw-train.tar", "whereis")
        assert status == 200
        pil, np_ = where.decode().split("|")
        assert "/cache/deps/python3-" in pil and "/cache/deps/python3-" in np_
    finally:
        stop(etl_cluster, "imagenet")
        stop(etl_cluster, "whereis")


def test_etl_metrics_per_etl_and_comm_type(etl_cluster: LocalCluster) -> None:
    status, out = build(etl_cluster, MD5_CODE, id="metered", communication_type="hrev://")
    assert status == 200, out
    try:
        for i in range(6):
            put(etl_cluster, "metered", f"o{i}", b"x" * 100)
            assert transform_get(etl_cluster, "metered", f"o{i}", "metered")[0] == 200
        total = 0.0
        ready = 0.0
        for t in etl_cluster.smap():
            text = http("GET", t["url"] + "/metrics")[1].decode()
            m = re.search(r'aisetl_etl_requests_total\{comm_type="hrev",etl="metered"\} (\S+)',
                          text)
            total += float(m.group(1)) if m else 0
            m = re.search(r'aisetl_etl_transformers_ready\{etl="metered"\} (\S+)', text)
            ready += float(m.group(1)) if m else 0
        assert total == 6 and ready == 3
    finally:
        stop(etl_cluster, "metered")


@pytest.mark.slow
def test_1gib_through_hpush_identity_with_bounded_memory(etl_cluster: LocalCluster,
                                                         tmp_path: Path) -> None:
    status, etl_id = build(etl_cluster, IDENTITY_STREAM_CODE, id="ident")
    assert status == 200, etl_id
    try:
        src = tmp_path / "big"
        block = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for _ in range(1024):
                f.write(block)
        url = f"{etl_cluster.endpoint}/v1/objects/big1g/one"
        put(etl_cluster, "big1g", "warm", b"x")
        subprocess.run(["curl", "-sSf", "-L", "-X", "PUT", "-T", str(src), url], check=True)
        src.unlink()
        procs = {"gateway": etl_cluster.role_process("gateway")}
        for t in etl_cluster.smap():
            procs[t["id"]] = etl_cluster.role_process(t["id"])
        for i, p in enumerate(transformer_pids(etl_cluster, "ident")):
            procs[f"transformer{i}"] = p
            for j, w in enumerate(p.children()):
                procs[f"transformer{i}.worker{j}"] = w
        md5 = hashlib.md5()
        with RssSampler(procs) as mem:
            t0 = time.monotonic()
            with subprocess.Popen(["curl", "-sSf", "-L", url + "?uuid=ident"],
                                  stdout=subprocess.PIPE) as p:
                assert p.stdout is not None
                n = 0
                while chunk := p.stdout.read(1 << 20):
                    md5.update(chunk)
                    n += len(chunk)
            secs = time.monotonic() - t0
        assert p.returncode == 0 and n == 1 << 30
        expect = hashlib.md5()
        for _ in range(1024):
            expect.update(block)
        assert md5.hexdigest() == expect.hexdigest()
        growth = mem.growth_mib()
        print(f"\n1 GiB via hpush identity: {1024 / secs:.0f} MiB/s; RSS growth MiB: {growth}")
        for name, grown in growth.items():
            assert grown < 96, f"{name} grew {grown:.0f} MiB while 1 GiB streamed"
    finally:
        stop(etl_cluster, "ident")


def test_a_stream_cut_off_mid_transform_is_one_line_from_the_cli(
        etl_cluster: LocalCluster) -> None:
    import subprocess as sp

    code = ("async def transform_stream(chunks):\n"
            "    n = 0\n"
            "    async for c in chunks:\n"
            "        n += 1\n"
            "        if n == 2:\n"
            "            raise RuntimeError('second chunk')\n"
            "        yield c\n")
    # hrev: the transformer has read the object and started answering when it fails
    status, out = build(etl_cluster, code, id="midfail", communication_type="hrev://")
    assert status == 200, out
    try:
        put(etl_cluster, "midfail", "two-mib", os.urandom(2 << 20))
        r = sp.run(["ais", "etl", "object", "midfail", "midfail/two-mib", "-"],
                   env={**os.environ, "AIS_ENDPOINT": etl_cluster.endpoint},
                   capture_output=True, timeout=60)
        assert r.returncode == 1
        lines = r.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ais: ") and "cut off" in lines[0], \
            r.stderr
    finally:
        stop(etl_cluster, "midfail")


def test_stopping_an_etl_while_it_starts_ends_the_wait(etl_cluster: LocalCluster) -> None:
    code = "import time\ntime.sleep(60)\ndef transform(b):\n    return b\n"
    result: dict[str, object] = {}

    def start() -> None:
        result["r"] = build(etl_cluster, code, id="stopearly", wait_timeout="90s")

    th = threading.Thread(target=start)
    t0 = time.monotonic()
    th.start()

    def declared() -> bool:
        listing = json.loads(http("GET", etl_cluster.endpoint + "/v1/etl/list")[1])
        return "stopearly" in [e["id"] for e in listing]

    wait_until(declared, 30, "the ETL to be declared")
    stop(etl_cluster, "stopearly")
    th.join(60)
    status, body = result["r"]  # type: ignore[misc]
    assert status == 409 and "stopped while it was starting" in body, body
    assert time.monotonic() - t0 < 45, "the build must not wait out its 90 s"
    wait_until(lambda: not transformer_pids(etl_cluster, "stopearly"), 15,
               "its transformers to be gone")
