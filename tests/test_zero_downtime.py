"""Rolling restart, scale-down and recycling under keep-alive load: not one failed request."""

from __future__ import annotations

import os
import signal
from typing import Any

from conftest import Load, get, wait_for


def _reload_twice_under(load: Load, cluster: Any, requests: int) -> None:
    """`requests` served, two rolling restarts (generations 2 and 3), `requests` more served."""
    load.wait_requests(requests)
    for generation in (2, 3):
        result = cluster.cli("reload")
        assert result.returncode == 0, result.stderr
        assert f"generation {generation}" in result.stdout
    load.wait_requests(requests)


def test_rolling_restart_under_keepalive_load_drops_nothing(start_cluster):
    cluster = start_cluster(workers=3)
    before = {w["pid"] for w in cluster.status()["workers"]}
    with Load(cluster.port, clients=16) as load:
        _reload_twice_under(load, cluster, requests=500)
    assert load.failures == [], load.failures[:5]
    workers = cluster.wait_ready(3)
    assert {w["generation"] for w in workers} == {3}
    assert not before & {w["pid"] for w in workers}
    assert "cluster.reloaded" in cluster.output()


def test_rolling_restart_under_a_connection_per_request_drops_nothing(start_cluster):
    """Clients that open a connection per request: the workers accept with uvloop's own server (see
    runtime.balance), and a drain must still hand over every connection it accepted."""
    cluster = start_cluster(workers=3)
    with Load(cluster.port, clients=16, new_connection=True) as load:
        _reload_twice_under(load, cluster, requests=1000)
    assert load.failures == [], load.failures[:5]
    assert {w["generation"] for w in cluster.wait_ready(3)} == {3}


def test_sighup_rolls_the_cluster(start_cluster):
    cluster = start_cluster(workers=2)
    before = {w["pid"] for w in cluster.status()["workers"]}
    os.kill(cluster.proc.pid, signal.SIGHUP)

    def rolled():
        workers = cluster.ready_workers()
        return (
            len(workers) == 2 and all(w["generation"] == 2 for w in workers) and len(cluster.status()["workers"]) == 2
        )

    wait_for(rolled, 20, "generation 2 everywhere")
    assert not before & {w["pid"] for w in cluster.status()["workers"]}


def test_scale_down_under_load_drops_nothing(start_cluster):
    cluster = start_cluster(workers=4)
    with Load(cluster.port, clients=16) as load:
        load.wait_requests(500)
        assert cluster.cli("scale", "-2").returncode == 0
        cluster.wait_ready(2)
        load.wait_requests(500)
    assert load.failures == [], load.failures[:5]
    exited = [e for e in cluster.worker_events() if e["event"] == "exited"]
    assert len(exited) == 2 and all(e["reason"] == "scale" for e in exited)


def test_max_requests_recycles_one_at_a_time_under_load(start_cluster):
    cluster = start_cluster(workers=2, config="[server]\nmax_requests = 400\nmax_requests_jitter = 50\n")
    with Load(cluster.port, clients=8) as load:
        wait_for(lambda: len([e for e in cluster.worker_events() if e["event"] == "recycled"]) >= 3, 60, "3 recycles")
        load.wait_requests(200)
    assert load.failures == [], load.failures[:5]
    recycled = [e for e in cluster.worker_events() if e["event"] == "recycled"]
    assert all("max_requests" in e["reason"] for e in recycled)
    assert cluster.proc.poll() is None


def test_unhealthy_replacement_rolls_back_and_old_workers_keep_serving(start_cluster, tmp_path):
    flag = tmp_path / "unhealthy"
    cluster = start_cluster(
        workers=2,
        config='[server]\nhealth_path = "/healthz"\nready_timeout = 3\n',
        env={"TEST_UNHEALTHY_FILE": str(flag)},
    )
    before = {w["pid"] for w in cluster.status()["workers"]}
    flag.touch()
    with Load(cluster.port, clients=4) as load:
        result = cluster.cli("reload")
        load.wait_requests(100)
    assert result.returncode != 0
    assert "health check failed" in result.stderr and "503" in result.stderr
    assert load.failures == [], load.failures[:5]
    workers = cluster.wait_ready(2)
    assert {w["pid"] for w in workers} == before
    assert "cluster.reload_failed" in cluster.output()
    code, _ = get(cluster.port)
    assert code == 200


def test_max_memory_mb_recycles_one_worker_at_a_time(start_cluster):
    cluster = start_cluster(workers=2, config="[server]\nmax_memory_mb = 1\n")  # every worker is over 1 MiB

    def recycled():
        return [e for e in cluster.worker_events() if e["event"] == "recycled"]

    events = wait_for(lambda: len(recycled()) >= 2 and recycled(), 30, "two memory recycles")
    assert all("max_memory_mb" in e["reason"] for e in events)
    # Never more than one replacement at a time: capacity stays at 2 serving workers.
    for _ in range(10):
        workers = cluster.status()["workers"]
        assert sum(w["state"] == "starting" for w in workers) <= 1
        assert sum(w["state"] in ("ready", "draining") for w in workers) >= 2
