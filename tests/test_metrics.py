"""`[metrics] bind`: a real headless primary scraped over HTTP, parsed with prometheus-client's own parser."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, get, wait_for
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from runtime.config import ConfigError, load_settings
from runtime.metrics import BUCKET_BOUNDS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_config(port: int, extra: str = "") -> str:
    return f'[metrics]\nbind = "127.0.0.1:{port}"\n{extra}'


def scrape(port: int) -> Samples:
    """Every sample by (name, sorted labels); fails on anything the Prometheus text parser refuses."""
    code, body = get(port, "/metrics")
    assert code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape_openmetrics(port: int) -> list[str]:
    """What Prometheus itself asks for by default; the strict OpenMetrics parser must take it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        response = conn.getresponse()
        assert response.getheader("Content-Type", "").startswith("application/openmetrics-text")
        return [family.name for family in openmetrics_families(response.read().decode())]
    finally:
        conn.close()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def slot_requests(samples: Samples, slot: int) -> float:
    return sum(
        v for labels, v in series(samples, "clusterctl_worker_requests_total").items() if ("slot", str(slot)) in labels
    )


def test_requests_latency_states_and_loop_lag(start_cluster):
    port = free_port()
    cluster = start_cluster(workers=2, config=metrics_config(port))
    before = wait_for(lambda: scrape(port).get(("clusterctl_desired_workers", ())) == 2 and scrape(port), 10, "a view")
    assert value(before, "clusterctl_generation") == 1
    for slot in ("1", "2"):
        assert value(before, "clusterctl_worker_state", slot=slot, state="ready") == 1
        assert value(before, "clusterctl_worker_state", slot=slot, state="backoff") == 0
        assert value(before, "clusterctl_worker_restarts_total", slot=slot) == 0
    ok_before = sum(
        v
        for labels, v in series(before, "clusterctl_worker_requests_total").items()
        if ("status_class", "2xx") in labels
    )

    requests = 60
    for _ in range(requests):
        assert get(cluster.port)[0] == 200

    def counted():
        samples = scrape(port)
        ok = sum(
            v
            for labels, v in series(samples, "clusterctl_worker_requests_total").items()
            if ("status_class", "2xx") in labels
        )
        return ok >= ok_before + requests and samples

    after = wait_for(counted, 10, f"{requests} more 2xx requests counted")
    total = sum(series(after, "clusterctl_worker_requests_total").values())
    buckets = series(after, "clusterctl_request_duration_seconds_bucket")
    by_bound = sorted((float(dict(labels)["le"]), v) for labels, v in buckets.items())
    assert by_bound[-1] == (float("inf"), total), "the histogram counts every request the counters count"
    assert len(by_bound) == len(BUCKET_BOUNDS) + 1
    assert all(a[1] <= b[1] for a, b in zip(by_bound, by_bound[1:], strict=False)), "buckets are cumulative"
    assert by_bound[0][0] == pytest.approx(50e-6)
    assert sum(value(after, "clusterctl_worker_requests_in_flight", slot=s) for s in ("1", "2")) == 0
    # psutil samples each worker once a second, off the loop.
    rss = wait_for(
        lambda: min(value(scrape(port), "clusterctl_worker_resident_memory_bytes", slot=s) for s in "12"), 10
    )
    assert rss > 1_000_000

    # The probe sleeps 0.25 s on an idle loop: it wakes a few milliseconds late at most.
    assert 0 <= value(after, "clusterctl_event_loop_lag_seconds") < 0.25
    assert 0 <= value(after, "clusterctl_event_loop_lag_max_seconds") < 1.0
    assert value(after, "process_resident_memory_bytes") > 0  # the primary's own, from prometheus-client
    assert "clusterctl_request_duration_seconds" in scrape_openmetrics(port)


def test_kill_9_counts_a_restart_and_keeps_the_slot_counter(start_cluster):
    port = free_port()
    cluster = start_cluster(workers=2, config=metrics_config(port))
    for _ in range(40):
        get(cluster.port)
    wait_for(lambda: slot_requests(scrape(port), 1) > 0, 10, "slot 1 serving")
    # The killed worker's counts since its last heartbeat are lost with it; what was published stays.
    counted = slot_requests(scrape(port), 1)
    victim = next(w for w in cluster.status()["workers"] if w["id"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        samples = scrape(port)
        ready = value(samples, "clusterctl_worker_state", slot="1", state="ready") == 1
        return ready and value(samples, "clusterctl_worker_restarts_total", slot="1") == 1 and samples

    samples = wait_for(replaced, 20, "slot 1 restarted and ready")
    assert value(samples, "clusterctl_worker_restarts_total", slot="2") == 0
    assert slot_requests(samples, 1) >= counted, "a replaced worker's counts are kept, not reset"
    new = next(w for w in cluster.status()["workers"] if w["id"] == 1)
    assert new["pid"] != victim["pid"]
    for _ in range(40):
        get(cluster.port)
    wait_for(lambda: slot_requests(scrape(port), 1) > counted, 10, "the new worker's requests added to slot 1")


def test_job_runs_and_webhooks(start_cluster):
    port = free_port()
    config = metrics_config(
        port,
        """
[[jobs]]
name = "nap"
schedule = "0 0 1 1 *"
command = ["python", "-c", "import time; time.sleep(0.3)"]

[[webhooks]]
name = "ops"
url = "http://127.0.0.1:9/nobody-listens"
events = ["job.*"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
max_attempts = 1
""",
    )
    cluster = start_cluster(workers=1, config=config)
    samples = wait_for(lambda: scrape(port).get(("clusterctl_desired_workers", ())) == 1 and scrape(port), 10, "a view")
    assert value(samples, "clusterctl_job_runs_total", job="nap", status="succeeded") == 0
    assert value(samples, "clusterctl_job_run_duration_seconds_count", job="nap") == 0
    for status in ("pending", "failed", "dead", "delivered"):
        assert value(samples, "clusterctl_webhook_deliveries", endpoint="ops", status=status) == 0
    assert value(samples, "clusterctl_webhook_endpoint_enabled", endpoint="ops") == 1

    result = cluster.cli("run-job", "nap", "--wait")
    assert result.returncode == 0, result.stderr

    def job_counted():
        samples = scrape(port)
        done = value(samples, "clusterctl_job_runs_total", job="nap", status="succeeded") == 1
        return done and value(samples, "clusterctl_job_run_duration_seconds_count", job="nap") == 1 and samples

    samples = wait_for(job_counted, 10, "the run counted and timed")
    assert value(samples, "clusterctl_job_runs_total", job="nap", status="failed") == 0
    assert 0.3 <= value(samples, "clusterctl_job_run_duration_seconds_sum", job="nap") < 10
    assert value(samples, "clusterctl_job_runs_in_progress", job="nap") == 0

    # job.succeeded goes to "ops", which refuses the connection: one attempt, then dead.
    def delivery_dead():
        samples = scrape(port)
        return value(samples, "clusterctl_webhook_deliveries", endpoint="ops", status="dead") == 1 and samples

    samples = wait_for(delivery_dead, 20, "the delivery dead in the queue gauge")
    assert value(samples, "clusterctl_webhook_attempts_total", endpoint="ops", outcome="failed") == 1
    assert value(samples, "clusterctl_webhook_attempts_total", endpoint="ops", outcome="delivered") == 0


def test_scrape_time_with_8_workers(start_cluster):
    port = free_port()
    cluster = start_cluster(workers=8, config=metrics_config(port))
    for _ in range(100):
        get(cluster.port)
    wait_for(lambda: len(series(scrape(port), "clusterctl_worker_restarts_total")) == 8, 10, "8 slots in the view")
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        code, body = get(port, "/metrics")
        timings.append(time.perf_counter() - started)
        assert code == 200 and b"clusterctl_worker_requests_total" in body
    median = statistics.median(timings)
    print(f"\n/metrics with 8 workers: median {median * 1000:.2f} ms over 20 scrapes ({len(body)} bytes)")
    assert median < 0.1
    assert value(scrape(port), "clusterctl_event_loop_lag_max_seconds") < 1.0


@pytest.mark.parametrize(
    "bind",
    ['"nonsense"', '"unix:/tmp/metrics.sock"', '"127.0.0.1:0"', '"127.0.0.1:70000"', "9464", '"127.0.0.1:8000"'],
)
def test_bad_metrics_bind_is_a_config_error(tmp_path: Path, bind: str):
    path = tmp_path / "clusterctl.toml"
    path.write_text(f'[server]\nbind = "127.0.0.1:8000"\n[metrics]\nbind = {bind}\n')
    with pytest.raises(ConfigError, match=r"\[metrics\] bind: "):
        load_settings(path)


def test_no_metrics_section_means_no_metrics_server(tmp_path: Path):
    path = tmp_path / "clusterctl.toml"
    path.write_text('[app]\ntarget = "asgi_app:app"\n')
    assert load_settings(path).metrics.bind is None


def run_up(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "clusterctl.toml"
    path.write_text(config)
    args = [sys.executable, "-m", "runtime", "up", "--headless", "--config", str(path)]
    args += ["--bind", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "state.db"), "--app", "asgi_app:app"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "apps")}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_bad_metrics_bind_exits_2(tmp_path: Path):
    result = run_up(tmp_path, '[metrics]\nbind = "localhost"\n')
    assert result.returncode == 2, result.stderr
    assert "[metrics] bind: expected HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_stops_the_start(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_up(tmp_path, metrics_config(port))
    assert result.returncode == 2, result.stderr
    assert f"[metrics] bind 127.0.0.1:{port}: cannot listen: Address already in use" in result.stderr
    assert "worker.spawned" not in result.stderr, "refused before any worker started"
