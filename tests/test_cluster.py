"""The primary with real workers: serving, respawn, hangs, scale, primary death, stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

from conftest import get, pid_alive, port_free, wait_for


def test_workers_share_one_socket_and_report_status(start_cluster):
    cluster = start_cluster(workers=2)
    status = cluster.status()
    assert status["primary"]["pid"] == cluster.proc.pid
    assert status["primary"]["bind"] == f"127.0.0.1:{cluster.port}"
    assert status["desired_workers"] == 2
    assert sorted(w["id"] for w in status["workers"]) == [1, 2]
    for worker in status["workers"]:
        for key in (
            "pid",
            "state",
            "generation",
            "cpu_percent",
            "rss_bytes",
            "requests_total",
            "requests_per_second",
            "p99_ms",
            "restarts",
        ):
            assert key in worker
    assert {k: status["webhooks"][k] for k in ("pending", "failed", "delivered")} == {
        "pending": 0,
        "failed": 0,
        "delivered": 0,
    }

    pids = {w["pid"] for w in status["workers"]}
    seen = set()
    for _ in range(200):
        code, body = get(cluster.port)
        assert code == 200
        seen.add(json.loads(body)["pid"])
    assert seen <= pids

    code, body = get(cluster.port, "/env")
    env = json.loads(body)
    assert env["CLUSTERCTL_INSTANCE_TYPE"] == "worker"
    assert env["CLUSTERCTL_WORKER_ID"] in {"1", "2"}
    assert env["CLUSTERCTL_PRIMARY_PID"] == str(cluster.proc.pid)
    assert Path(env["CLUSTERCTL_DB"]) == cluster.db

    # Counters reach the primary with the heartbeats.
    wait_for(lambda: sum(w["requests_total"] for w in cluster.status()["workers"]) >= 201, 10, "request counts")
    assert stat.S_IMODE(next(cluster.db.parent.glob("state.db.*.sock")).stat().st_mode) == 0o600


def test_flask_app_is_detected_as_wsgi(start_cluster):
    cluster = start_cluster(app="flask_app:app", workers=1)
    code, body = get(cluster.port)
    assert code == 200 and json.loads(body)["framework"] == "flask"
    code, _ = get(cluster.port, "/teapot")
    assert code == 418


def test_killed_worker_is_replaced_in_its_slot(start_cluster):
    cluster = start_cluster(workers=2)
    victim = next(w for w in cluster.status()["workers"] if w["id"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced():
        slot = [w for w in cluster.status()["workers"] if w["id"] == 1]
        return slot and slot[0]["state"] == "ready" and slot[0]["pid"] != victim["pid"] and slot[0]

    new = wait_for(replaced, 15, "slot 1 replaced")
    elapsed = time.monotonic() - killed_at
    assert new["restarts"] == 1
    code, body = get(cluster.port, "/env")
    assert code == 200
    events = cluster.worker_events()
    crashed = [e for e in events if e["event"] == "crashed" and e["pid"] == victim["pid"]]
    assert crashed and crashed[0]["worker_id"] == 1 and "SIGKILL" in crashed[0]["reason"]
    assert elapsed < 10


def test_hung_worker_is_aborted_with_a_traceback_and_replaced(start_cluster):
    cluster = start_cluster(workers=1, config="[server]\ntimeout = 1\n")
    victim = cluster.status()["workers"][0]["pid"]
    threading.Thread(target=lambda: _ignore_errors(get, cluster.port, "/hang", 30), daemon=True).start()

    def killed():
        return [e for e in cluster.worker_events() if e["event"] == "killed" and e["pid"] == victim]

    event = wait_for(killed, 15, "the hung worker killed")[0]
    assert "no heartbeat" in event["reason"]
    wait_for(lambda: cluster.ready_workers() and cluster.ready_workers()[0]["pid"] != victim, 15, "replacement")
    log = (cluster.db.parent / "logs" / "workers.log").read_text()
    assert "Fatal Python error: Aborted" in log  # faulthandler's dump, kept from the worker's stderr
    assert "asgi_app.py" in log  # ... pointing at the line that hung


def test_crash_loop_backs_off(start_cluster, tmp_path):
    flag = tmp_path / "crash-at-import"
    cluster = start_cluster(workers=1, app="crashy_app:app", env={"TEST_CRASH_FLAG": str(flag)})
    victim = cluster.status()["workers"][0]["pid"]
    flag.touch()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: cluster.status()["workers"][0]["state"] == "backoff", 10, "slot in backoff")
    time.sleep(3)  # observe the loop for a while: back-off keeps the respawns few
    spawned = [e for e in cluster.worker_events() if e["event"] == "spawned"]
    assert len(spawned) <= 6, spawned
    assert cluster.proc.poll() is None
    flag.unlink()
    wait_for(lambda: cluster.ready_workers(), 40, "recovery once the app imports again")


def test_worker_never_outlives_a_killed_primary(start_cluster):
    cluster = start_cluster(workers=3)
    pids = [w["pid"] for w in cluster.status()["workers"]]
    os.kill(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait(5)
    deadline = time.monotonic() + 1.0
    wait_for(lambda: not any(pid_alive(p) for p in pids), 1.0, "workers gone within 1 s", interval=0.01)
    wait_for(lambda: port_free(cluster.port), max(0.05, deadline - time.monotonic()), "port free")


def test_scale_from_the_cli_and_by_signals(start_cluster):
    cluster = start_cluster(workers=1)
    assert cluster.cli("scale", "3").returncode == 0
    cluster.wait_ready(3)
    result = cluster.cli("scale", "-1")
    assert result.returncode == 0, result.stderr
    cluster.wait_ready(2)
    os.kill(cluster.proc.pid, signal.SIGTTIN)
    cluster.wait_ready(3)
    os.kill(cluster.proc.pid, signal.SIGTTOU)
    workers = cluster.wait_ready(2)
    assert sorted(w["id"] for w in workers) == [1, 2]
    assert cluster.cli("scale", "+1").returncode == 0
    cluster.wait_ready(3)
    bad = cluster.cli("scale", "-5")
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    assert "cluster.scaled" in cluster.output()


def test_graceful_stop_finishes_in_flight_requests(start_cluster):
    cluster = start_cluster(workers=2)
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(get(cluster.port, "/sleep?1.0", 10)[0]))
    thread.start()
    wait_for(lambda: sum(w["in_flight"] for w in cluster.status()["workers"]) == 1, 5, "request in flight")
    stop = cluster.cli("stop")
    thread.join(10)
    assert stop.returncode == 0, stop.stderr
    assert results == [200]
    assert cluster.proc.wait(10) == 0
    assert port_free(cluster.port)
    assert not list(cluster.db.parent.glob("state.db.*.sock"))


def test_sigterm_stops_the_cluster(start_cluster):
    cluster = start_cluster(workers=2)
    pids = [w["pid"] for w in cluster.status()["workers"]]
    os.kill(cluster.proc.pid, signal.SIGTERM)
    assert cluster.proc.wait(15) == 0
    assert not any(pid_alive(p) for p in pids)
    exited = {e["pid"] for e in cluster.worker_events() if e["event"] == "exited"}
    assert exited == set(pids)


def test_before_start_runs_once_on_the_primary_before_workers(start_cluster, tmp_path):
    marker = tmp_path / "before.json"
    script = (
        "import json, os, sys; "
        f"json.dump({{k: v for k, v in os.environ.items() if k.startswith('CLUSTERCTL_')}}, open({str(marker)!r}, 'w'))"
    )
    cluster = start_cluster(workers=2, config=f'[app]\nbefore_start = ["{_python()}", "-c", "{script}"]\n')
    env = json.loads(marker.read_text())
    assert env["CLUSTERCTL_INSTANCE_TYPE"] == "primary"
    assert env["CLUSTERCTL_PRIMARY_PID"] == str(cluster.proc.pid)
    first_spawn = cluster.worker_events()[0]
    assert marker.stat().st_mtime <= time.time()
    assert first_spawn["event"] == "spawned"


def test_worker_output_is_captured_to_rotating_logs(start_cluster):
    cluster = start_cluster(workers=1, app="chatty_app:app")
    log = cluster.db.parent / "logs" / "workers.log"
    wait_for(lambda: log.exists() and "hello from import" in log.read_text(), 10, "worker stdout in the log")
    get(cluster.port)
    wait_for(lambda: "served a request" in log.read_text(), 10, "worker stderr in the log")
    assert "w1[" in log.read_text()


def _python() -> str:
    import sys

    return sys.executable


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the hung request is expected to fail
        pass


def test_serves_on_a_unix_socket(start_cluster, tmp_path):
    import http.client
    import socket as socketlib

    path = tmp_path / "app.sock"
    cluster = start_cluster("--bind", f"unix:{path}", workers=2)
    sock = socketlib.socket(socketlib.AF_UNIX)
    sock.connect(str(path))
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["worker"] in {"1", "2"}
    conn.close()
    assert cluster.status()["primary"]["bind"] == f"unix:{path}"
    assert cluster.cli("stop").returncode == 0
    assert not path.exists()


def test_keepalive_responses_do_not_wait_for_nagle(start_cluster):
    # With Nagle on, each keep-alive response's second write waits for the delayed ACK (~40 ms).
    import http.client

    cluster = start_cluster(workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=5)
    conn.request("GET", "/")
    conn.getresponse().read()
    started = time.perf_counter()
    for _ in range(50):
        conn.request("GET", "/")
        conn.getresponse().read()
    elapsed = time.perf_counter() - started
    conn.close()
    assert elapsed < 1.0, f"50 keep-alive requests took {elapsed:.2f}s (Nagle would make it ~2s)"


def test_status_reports_rates_and_latency_under_load(start_cluster):
    from conftest import Load

    cluster = start_cluster(workers=2)

    def measured():
        s = cluster.status()
        sampled = all(w["rss_bytes"] for w in s["workers"])  # psutil samples once a second
        return s["totals"]["requests_per_second"] > 50 and sampled and s

    with Load(cluster.port, clients=4):
        status = wait_for(measured, 10, "a request rate and sampled memory")
    assert status["totals"]["p99_ms"] > 0
    assert all(w["rss_bytes"] > 10_000_000 for w in status["workers"])
    assert any(w["requests_per_second"] > 0 for w in status["workers"])


def test_control_socket_refuses_another_user(start_cluster):
    import subprocess
    import sys

    cluster = start_cluster(workers=1)
    sock = next(cluster.db.parent.glob("state.db.*.sock"))
    code = (
        "import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX)\n"
        f'try:\n    s.connect({str(sock)!r}); s.sendall(b\'{{"cmd": "status"}}\\n\'); print(s.recv(999))\n'
        "except OSError as e:\n    print('refused', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert "refused" in result.stdout or "permission denied" in result.stdout, result
    assert '"ok": true' not in result.stdout


def test_keepalive_connections_are_spread_across_workers(start_cluster):
    from conftest import Load

    cluster = start_cluster(workers=4)
    with Load(cluster.port, clients=12) as load:
        load.wait_requests(2000)

        def spread():
            counts = [w["connections"] for w in cluster.status()["workers"]]
            return sum(counts) == 12 and counts

        counts = wait_for(spread, 10, "all 12 connections reported")
        load.wait_requests(1000)
    assert max(counts) - min(counts) <= 2, counts  # 3 each, give or take the slack
    assert len(load.by_pid) == 4 and min(load.by_pid.values()) > 0, load.by_pid
