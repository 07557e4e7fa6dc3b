"""init without a container engine fails with a message saying so."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.etl.test_seed_flows import SPEC
from tests.support.cluster import LocalCluster, http


def test_init_without_a_container_engine_says_so(tmp_path: Path) -> None:
    # a PATH with this Python and nothing else: no podman, no docker
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python3")
    env = {"PATH": str(bin_dir), "AISETL_CONTAINER_ENGINE": ""}
    with LocalCluster(tmp_path / "state", targets=2, env=env) as c:
        status, body, _ = http("POST", c.endpoint + "/v1/etl/init", SPEC.read_bytes(),
                               timeout=60)
        assert status == 422, body
        message = json.loads(body)["message"]
        assert "need a container engine (podman or docker)" in message
        assert "target t1" in message and "target t2" in message
        listing = json.loads(http("GET", c.endpoint + "/v1/etl/list")[1])
        assert listing == []
