"""The seed's ETL examples, verbatim, through the CLI and through curl."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.etl.helpers import MD5_CODE, sh
from tests.support.cluster import LocalCluster
from tests.support.prereq import require

SEED_MD5 = "393c6706efb128fbc442d3f7d084a426"
ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{9}$")
SPEC = Path(__file__).parent.parent / "fixtures" / "md5_server" / "spec.yaml"


def test_md5_simplified_flow_via_cli(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "code.py").write_text(MD5_CODE)
    r = sh("ais etl build --from-file=code.py --runtime=python3", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    etl_id = r.stdout.strip()
    assert ID_RE.match(etl_id), etl_id
    assert sh("ais create bucket transform", env).returncode == 0
    assert sh('echo "some text :)" | ais put - transform/shard.in', env).returncode == 0
    r = sh(f"ais etl object {etl_id} transform/shard.in -", env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == SEED_MD5
    r = sh("ais etl ls", env)
    assert etl_id in r.stdout and "Ready" in r.stdout
    r = sh(f"ais etl logs {etl_id}", env)
    assert r.returncode == 0 and "== target t1" in r.stdout
    r = sh(f"ais etl stop {etl_id}", env)
    assert r.stdout.strip() == "ETL containers stopped successfully."
    assert etl_id not in sh("ais etl ls", env).stdout
    r = sh(f"ais etl object {etl_id} transform/shard.in -", env)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_md5_simplified_flow_via_curl(env: dict[str, str], etl_cluster: LocalCluster,
                                      tmp_path: Path) -> None:
    import json

    g = etl_cluster.endpoint
    body = json.dumps({"code": MD5_CODE, "dependencies": "", "runtime": "python3"})
    r = sh(f"curl -sf -X POST '{g}/v1/etl/build' -d '{body}'", env)
    assert r.returncode == 0, r.stderr
    etl_id = r.stdout.strip()
    assert ID_RE.match(etl_id)
    sh("ais create bucket shards", env)
    (tmp_path / "shard01.tar").write_bytes(b"some text :)\n")
    assert sh(f"curl -sf -L -X PUT -T shard01.tar '{g}/v1/objects/shards/shard01.tar'", env,
              cwd=tmp_path).returncode == 0
    r = sh(f"curl -sf -L -X GET '{g}/v1/objects/shards/shard01.tar?uuid={etl_id}' "
           "-o transformed_shard01.tar", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "transformed_shard01.tar").read_text() == SEED_MD5
    listing = json.loads(sh(f"curl -sf -L -X GET '{g}/v1/etl/list'", env).stdout)
    assert etl_id in [e["id"] for e in listing]
    assert sh(f"curl -sf -X DELETE '{g}/v1/etl/stop/{etl_id}'", env).returncode == 0
    listing = json.loads(sh(f"curl -sf -L -X GET '{g}/v1/etl/list'", env).stdout)
    assert etl_id not in [e["id"] for e in listing]


def _podman_ready() -> None:
    require(shutil.which("podman") is not None, "podman", "bash hack/container-setup.sh")
    ok = subprocess.run(["podman", "image", "exists", "quay.io/user/md5_server:v1"],
                        capture_output=True).returncode == 0
    require(ok, "image quay.io/user/md5_server:v1", "bash hack/build-seed-image.sh")


@pytest.mark.container
def test_md5_regular_flow_with_the_seed_spec_via_cli_and_curl(
        env: dict[str, str], etl_cluster: LocalCluster, tmp_path: Path) -> None:
    _podman_ready()
    shutil.copy(SPEC, tmp_path / "spec.yaml")
    r = sh("ais etl init spec.yaml", env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    etl_id = r.stdout.strip()
    assert ID_RE.match(etl_id)
    labels = subprocess.run(["podman", "ps", "--filter", f"label=aisetl.etl={etl_id}",
                             "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert len(labels.split()) == 3, "one transformer container per target"
    sh("ais create bucket transform", env)
    sh('echo "some text :)" | ais put - transform/shard.in', env)
    r = sh(f"ais etl object {etl_id} transform/shard.in -", env)
    assert r.stdout.strip() == SEED_MD5, r.stderr
    assert sh(f"ais etl stop {etl_id}", env).returncode == 0
    left = subprocess.run(["podman", "ps", "-a", "--filter", f"label=aisetl.etl={etl_id}",
                           "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert left.strip() == "", "stop removes every container"

    r = sh(f"curl -sf -X POST '{etl_cluster.endpoint}/v1/etl/init' -T spec.yaml", env,
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    etl_id = r.stdout.strip()
    r = sh(f"curl -sf -L '{etl_cluster.endpoint}/v1/objects/transform/shard.in?uuid={etl_id}'",
           env)
    assert r.stdout == SEED_MD5
    assert sh(f"ais etl stop {etl_id}", env).returncode == 0
