"""Processes come and go: restarts keep data, membership follows liveness, no orphans."""

from __future__ import annotations

import signal
import time

import psutil

from tests.cluster.test_objects import get, make_bucket, put
from tests.support.cluster import LocalCluster, http, wait_until


def test_killed_target_is_restarted_and_serves_its_objects(fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    make_bucket(c, "keep")
    for i in range(30):
        put(c, "keep", f"k{i}", f"v{i}".encode())
    url_before = {t["id"]: t["url"] for t in c.smap()}["t2"]
    victim = c.role_process("t2")
    on_t2 = [p.name for p in (c.target_data("t2") / "buckets" / "keep").iterdir()]
    assert on_t2, "t2 should own some objects"
    victim.kill()
    victim.wait(10)
    wait_until(lambda: (c.find_role("t2") or victim).pid != victim.pid, 20, "t2 restart")
    wait_until(c.healthy, 30, "cluster healthy again")
    wait_until(lambda: "t2" in {t["id"] for t in c.smap()}, 20, "t2 to rejoin")
    assert {t["id"]: t["url"] for t in c.smap()}["t2"] == url_before, "same URL after restart"

    def t2_serves() -> bool:
        try:
            return http("GET", url_before + "/v1/health", timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(t2_serves, 20, "restarted t2 to serve")
    for i in range(30):
        assert get(c, "keep", f"k{i}") == (200, f"v{i}".encode())


def test_frozen_target_leaves_the_map_and_rejoins(fresh_cluster: LocalCluster) -> None:
    c = fresh_cluster
    t3 = c.role_process("t3")
    t3.suspend()
    try:
        wait_until(lambda: "t3" not in {t["id"] for t in c.smap()}, 15, "t3 to leave the map")
        status, _, _ = http("GET", c.endpoint + "/v1/health")
        assert status == 503
    finally:
        t3.resume()
    wait_until(lambda: "t3" in {t["id"] for t in c.smap()}, 15, "t3 to rejoin")
    wait_until(c.healthy, 15, "health 200 again")


def _all_gone(pids: list[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


def test_interrupting_up_stops_every_process(tmp_path: object) -> None:
    from pathlib import Path

    c = LocalCluster(Path(str(tmp_path)) / "s", targets=2).start()
    pids = [p.pid for p in c.processes()]
    assert len(pids) == 4  # up, gateway, 2 targets
    t0 = time.monotonic()
    assert c.stop(signal.SIGINT) == 0
    wait_until(lambda: _all_gone(pids), 15, "every process to exit")
    assert time.monotonic() - t0 < 15


def test_killing_up_outright_leaves_no_orphans(tmp_path: object) -> None:
    from pathlib import Path

    c = LocalCluster(Path(str(tmp_path)) / "s", targets=2).start()
    pids = [p.pid for p in c.processes()]
    c.stop(signal.SIGKILL)
    wait_until(lambda: _all_gone(pids), 15, "children to die with their parent")


def test_up_restarts_a_crashing_child_and_still_stops_cleanly(tmp_path: object) -> None:
    from pathlib import Path

    c = LocalCluster(Path(str(tmp_path)) / "s", targets=2).start()
    gw = c.role_process("gateway")
    gw.kill()
    wait_until(lambda: (c.find_role("gateway") or gw).pid != gw.pid, 20, "gateway restart")
    wait_until(c.healthy, 20, "healthy after the gateway restart")
    pids = [p.pid for p in c.processes()]
    assert c.stop(signal.SIGTERM) == 0
    wait_until(lambda: _all_gone(pids), 15, "every process to exit")
    assert "gateway exited" in c.log.read_text()


def test_objects_stay_readable_when_a_target_joins(tmp_path: object) -> None:
    """HRW moves a quarter of the names to a new target; reads find them where they are."""
    from pathlib import Path

    state = Path(str(tmp_path)) / "s"
    with LocalCluster(state, targets=3) as c:
        make_bucket(c, "grow")
        for i in range(40):
            put(c, "grow", f"g{i}", f"v{i}".encode())
    with LocalCluster(state, targets=4) as c:
        wait_until(lambda: len(c.smap()) == 4, 20, "4 targets")
        moved = 0
        for i in range(40):
            url = f"{c.endpoint}/v1/objects/grow/g{i}"
            hops = 0
            while (r := http("GET", url))[0] == 307:
                url, hops = r[2]["Location"], hops + 1
            assert (r[0], r[1]) == (200, f"v{i}".encode())
            moved += hops == 2  # gateway -> new owner -> the target that holds it
        assert moved > 0, "some names must now belong to the new target"
        assert get(c, "grow", "never-written")[0] == 404
