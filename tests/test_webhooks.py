"""Webhook delivery end to end: real primaries, real workers calling emit(), a real receiver checking signatures.

The wire format and the unit behaviour of emit() are in test_outbox.py; here every
event goes through a worker (or the primary), the store and the delivery runner to
`tests/receiver.py`, which verifies each Standard Webhooks signature on its own.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from conftest import Load, get, pid_alive, wait_for
from receiver import Answer, Receiver

from runtime.store import Store

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B64 = SECRET.removeprefix("whsec_")
ENV = {"TEST_HOOK_SECRET": SECRET}


@pytest.fixture
def rx():
    with Receiver(SECRET) as receiver:
        yield receiver


def hook(name: str, url: str, events: tuple[str, ...] = ("app.*",), **keys: object) -> str:
    """One `[[webhooks]]` table; quick retries unless told otherwise."""
    keys = {"retry_base": 0.1, **keys}
    lines = [
        "[[webhooks]]",
        f"name = {json.dumps(name)}",
        f"url = {json.dumps(url)}",
        f"events = {json.dumps(list(events))}",
        'secret = "env:TEST_HOOK_SECRET"',
        *(f"{key} = {json.dumps(value)}" for key, value in keys.items()),
    ]
    return "\n".join(lines) + "\n\n"


def start(start_cluster, *hooks: str, workers: int = 1, **kwargs):
    return start_cluster(app="emit_app:app", workers=workers, config="".join(hooks), env=ENV, **kwargs)


def emit_via(cluster, kind: str = "app.test", n: int = 1, tag: str = "") -> dict:
    """Ask a worker to emit n events; returns {"ids", "data", "worker", "pid"}."""
    code, body = get(cluster.port, f"/emit?type={kind}&n={n}&tag={tag}")
    assert code == 200, body
    result = json.loads(body)
    assert len(result["ids"]) == n
    return result


def deliveries(cluster, endpoint: str | None = None) -> list[dict]:
    args = ["--endpoint", endpoint] if endpoint else []
    result = cluster.cli("webhooks", "--json", "--limit", "1000", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rows(cluster, endpoint: str) -> list[dict]:
    """The endpoint's deliveries straight from `webhook_deliveries` (cheaper than the CLI, for polling), newest first."""
    conn = sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM webhook_deliveries WHERE endpoint = ? ORDER BY id DESC"
        return [dict(row) for row in conn.execute(query, (endpoint,))]
    finally:
        conn.close()


def counts(cluster) -> dict:
    return cluster.status()["webhooks"]


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def db_event_ids(cluster, kind: str) -> set[str]:
    conn = sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM webhook_events WHERE type = ?", (kind,))}
    finally:
        conn.close()


def received_all(rx: Receiver, path: str, ids) -> bool:
    return set(ids) <= set(rx.ids(path))


# ---------------------------------------------------------------------------- 1. workers emit, the primary delivers


def test_events_emitted_in_workers_are_delivered_once_by_the_primary(start_cluster):
    with Receiver(SECRET, who=True) as rx:
        cluster = start(start_cluster, hook("all", rx.url("/all")), workers=2)
        emitted: dict[str, tuple[str, dict]] = {}  # id -> (worker, data)

        def both_workers_emitted() -> bool:
            result = emit_via(cluster, "app.order_created", n=3)
            for event_id, data in zip(result["ids"], result["data"], strict=True):
                emitted[event_id] = (result["worker"], data)
            return {worker for worker, _ in emitted.values()} == {"1", "2"}

        wait_for(both_workers_emitted, 15, "events emitted by both workers")
        n = len(emitted)
        wait_for(lambda: received_all(rx, "/all", emitted), 15, f"all {n} events received")
        wait_for(lambda: counts(cluster)["delivered"] == n, 10, f"status --json to count {n} delivered")
        assert counts(cluster)["pending"] == 0
        assert counts(cluster)["failed"] == 0

        requests = rx.requests("/all")
        assert Counter(r.id for r in requests) == Counter(list(emitted)), "each id exactly once, nothing else"
        for request in requests:
            assert request.signature_ok, request.headers
            assert request.sender_pid == cluster.proc.pid, "only the primary delivers"
            body = request.json()
            assert set(body) == {"type", "timestamp", "data"}
            assert body["type"] == "app.order_created"
            assert body["data"] == emitted[request.id][1]
            datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
            assert abs(request.timestamp - time.time()) < 60


def test_workers_emitting_under_load_deliver_every_event_exactly_once(start_cluster, rx):
    cluster = start(start_cluster, hook("load", rx.url("/load"), concurrency=8), workers=2)
    with Load(cluster.port, clients=8, path="/emit?type=app.load&n=1") as load:
        load.wait_requests(300, timeout=30)
    assert load.failures == []
    assert len(load.by_pid) == 2, f"both workers emitted: {load.by_pid}"

    ids = db_event_ids(cluster, "app.load")
    assert len(ids) == load.ok
    wait_for(lambda: received_all(rx, "/load", ids), 30, f"{len(ids)} events received")
    wait_for(lambda: counts(cluster)["delivered"] == len(ids), 10, "status --json to count every delivery")
    assert counts(cluster)["pending"] == 0 and counts(cluster)["failed"] == 0
    requests = rx.requests("/load")
    assert Counter(r.id for r in requests) == Counter(ids), "each id exactly once"
    assert all(r.signature_ok for r in requests)


# ---------------------------------------------------------------------------- 2. cluster events


def test_cluster_events_reach_the_endpoints_whose_filters_match(start_cluster, rx):
    cluster = start(
        start_cluster,
        hook("workers", rx.url("/workers"), events=("worker.*",)),
        hook("jobs", rx.url("/jobs"), events=("job.failed",)),
        hook("cluster", rx.url("/cluster"), events=("cluster.*",)),
        workers=2,
    )
    victim = next(w for w in cluster.status()["workers"] if w["id"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)

    def types(path: str) -> list[str]:
        return [r.json()["type"] for r in rx.requests(path)]

    wait_for(lambda: "worker.crashed" in types("/workers"), 15, "worker.crashed delivered")
    crashed = next(r for r in rx.requests("/workers") if r.json()["type"] == "worker.crashed")
    assert crashed.signature_ok
    assert str(victim["pid"]) in json.dumps(crashed.json()["data"]), "the payload names the killed worker"
    cluster.wait_ready(2)

    assert cluster.cli("scale", "1").returncode == 0
    wait_for(lambda: "cluster.scaled" in types("/cluster"), 15, "cluster.scaled delivered")
    cluster.wait_ready(1)
    result = cluster.cli("reload")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "cluster.reloaded" in types("/cluster"), 15, "cluster.reloaded delivered")

    assert set(types("/workers")) == {"worker.crashed"}
    assert not [t for t in types("/cluster") if not t.startswith("cluster.")]
    assert all(r.signature_ok for r in rx.requests())
    assert rx.requests("/jobs") == [], "job.failed endpoint got cluster events"
    assert deliveries(cluster, "jobs") == []


# ---------------------------------------------------------------------------- 3-4. retries


def test_retries_keep_the_webhook_id_and_sign_every_attempt(start_cluster, rx):
    rx.answer("/flaky", Answer(500), Answer(500), then=Answer(200))
    cluster = start(start_cluster, hook("flaky", rx.url("/flaky"), max_attempts=5))
    (event_id,) = emit_via(cluster, "app.retry")["ids"]

    wait_for(lambda: rows(cluster, "flaky")[0]["status"] == "delivered", 15, "delivery after two failures")
    (row,) = deliveries(cluster, "flaky")
    assert (row["event_id"], row["status"]) == (event_id, "delivered")
    assert row["attempt"] == 3
    assert row["response_code"] == 200
    requests = rx.requests("/flaky")
    assert [r.status for r in requests] == [500, 500, 200]
    assert [r.id for r in requests] == [event_id] * 3
    assert all(r.signature_ok for r in requests)
    assert len({r.body for r in requests}) == 1, "the same body on every attempt"


def test_retry_after_is_honoured(start_cluster, rx):
    rx.answer("/limited", Answer(429, headers={"Retry-After": "2"}), then=Answer(200))
    cluster = start(start_cluster, hook("limited", rx.url("/limited"), max_attempts=5))
    (event_id,) = emit_via(cluster, "app.limited")["ids"]
    wait_for(lambda: len(rx.requests("/limited")) >= 2, 15, "a second attempt")
    first, second = rx.requests("/limited")[:2]
    assert first.id == second.id == event_id
    gap = second.at - first.at
    assert gap >= 1.9, f"second attempt {gap:.2f}s after a 429 with Retry-After: 2 (retry_base is 0.1)"
    assert gap < 6, gap
    wait_for(lambda: rows(cluster, "limited")[0]["status"] == "delivered", 10, "delivered")
    (row,) = deliveries(cluster, "limited")
    assert (row["event_id"], row["attempt"], row["status"]) == (event_id, 2, "delivered")


# ---------------------------------------------------------------------------- 5. 410 Gone


def test_410_gone_disables_the_endpoint_and_the_others_keep_working(start_cluster, rx):
    rx.answer("/gone", then=Answer(410))
    cluster = start(start_cluster, hook("gone", rx.url("/gone")), hook("ok", rx.url("/ok")))
    first = emit_via(cluster, "app.before")["ids"][0]
    wait_for(lambda: "webhook.endpoint_disabled" in cluster.output(), 15, "the primary to say it disabled gone")
    line = next(x for x in cluster.output().splitlines() if "webhook.endpoint_disabled" in x)
    assert "gone" in line and "410" in line, line
    (row,) = deliveries(cluster, "gone")
    assert (row["event_id"], row["status"], row["response_code"]) == (first, "dead", 410)
    assert rx.ids("/gone") == [first]

    later = emit_via(cluster, "app.after", n=2)["ids"]
    time.sleep(1.2)  # past any cache of the endpoint list in the worker
    later += emit_via(cluster, "app.after", n=2)["ids"]
    wait_for(lambda: received_all(rx, "/ok", [first, *later]), 15, "the other endpoint to get everything")
    time.sleep(0.5)
    assert rx.ids("/gone") == [first], "a disabled endpoint was sent more events"
    assert all(d["status"] == "delivered" for d in deliveries(cluster, "ok"))


# ---------------------------------------------------------------------------- 6. dead, then replay


def test_max_attempts_then_dead_then_replay_by_id_and_by_range(start_cluster, rx):
    rx.answer("/dead", then=Answer(500))
    cluster = start(start_cluster, hook("dead", rx.url("/dead"), max_attempts=2))
    (event_id,) = emit_via(cluster, "app.doomed")["ids"]

    wait_for(lambda: rows(cluster, "dead")[0]["status"] == "dead", 15, "the delivery to be dead")
    (row,) = deliveries(cluster, "dead")
    assert row["event_id"] == event_id
    assert row["attempt"] == 2 and row["response_code"] == 500
    time.sleep(0.5)  # no third attempt after dead
    assert rx.ids("/dead") == [event_id, event_id]

    last = rx.requests("/dead")[-1]
    wait_for(lambda: int(time.time()) > last.timestamp, 3, "the clock to move to a new second")
    rx.answer("/dead", then=Answer(200))
    result = cluster.cli("webhooks", "replay", str(row["id"]))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(rx.requests("/dead")) == 3, 10, "the replayed delivery")
    replayed = rx.requests("/dead")[2]
    assert replayed.id == event_id and replayed.signature_ok
    assert replayed.timestamp > last.timestamp, "a replay is signed afresh"
    assert replayed.body == last.body
    wait_for(lambda: rows(cluster, "dead")[0]["status"] == "delivered", 10, "the replay recorded delivered")
    newest = deliveries(cluster, "dead")[0]
    assert (newest["event_id"], newest["status"], newest["attempt"]) == (event_id, "delivered", 1)

    # By endpoint and time range: only the two events inside the range are queued again.
    rx.answer("/dead", then=Answer(500))
    since = iso_now()
    doomed = emit_via(cluster, "app.doomed", n=2)["ids"]
    wait_for(
        lambda: sum(d["status"] == "dead" and d["event_id"] in doomed for d in rows(cluster, "dead")) == 2,
        15,
        "two more dead deliveries",
    )
    until = iso_now()
    rx.answer("/dead", then=Answer(200))
    result = cluster.cli("webhooks", "replay", "--endpoint", "dead", "--since", since, "--until", until)
    assert result.returncode == 0, result.stderr
    assert "queued 2 " in result.stdout, result.stdout
    wait_for(lambda: Counter(rx.ids("/dead"))[doomed[1]] == 3, 10, "the range replayed")
    wait_for(lambda: Counter(rx.ids("/dead"))[doomed[0]] == 3, 10, "the range replayed")
    time.sleep(0.3)
    assert Counter(rx.ids("/dead")) == {event_id: 3, doomed[0]: 3, doomed[1]: 3}
    assert all(r.signature_ok for r in rx.requests("/dead"))


# ---------------------------------------------------------------------------- 7. isolation


def test_a_slow_endpoint_never_delays_the_others(start_cluster, rx):
    rx.answer("/slow", then=Answer(200, delay=3))
    cluster = start(
        start_cluster,
        hook("slow", rx.url("/slow"), concurrency=1, timeout=10),
        hook("fast", rx.url("/fast")),
    )
    ids = emit_via(cluster, "app.both", n=5)["ids"]
    started = time.monotonic()
    wait_for(lambda: received_all(rx, "/fast", ids), 5, "the fast endpoint to get all five")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"fast endpoint took {elapsed:.2f}s while the slow one sleeps 3s per request"
    assert len(rx.requests("/slow")) <= 1, "concurrency 1 on the slow endpoint"
    slow_rows = deliveries(cluster, "slow")
    assert not [d for d in slow_rows if d["status"] == "delivered"], "the slow endpoint is still going"
    assert sorted(rx.ids("/fast")) == sorted(ids)


# ---------------------------------------------------------------------------- 8. kill -9 of the primary


def test_nothing_is_lost_when_the_primary_is_killed_mid_delivery(start_cluster, rx):
    delay, concurrency = 1.0, 4
    rx.answer("/slow", then=Answer(200, delay=delay))
    config = hook("slow", rx.url("/slow"), concurrency=concurrency, timeout=10)
    cluster = start(start_cluster, config)
    worker_pids = {w["pid"] for w in cluster.status()["workers"]}
    ids = emit_via(cluster, "app.durable", n=20)["ids"]

    wait_for(lambda: len(rx.requests("/slow")) > concurrency, 10, "a second batch in flight")
    os.kill(cluster.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    cluster.proc.wait(5)
    wait_for(lambda: not any(pid_alive(pid) for pid in worker_pids), 5, "the workers to follow their primary")
    before = rx.requests("/slow")
    # Arrived but not answered when the primary died: the primary cannot have recorded them.
    unanswered = {r.id for r in before if r.at + delay > killed_at + 0.05}
    assert unanswered, "the test meant to kill the primary with deliveries in flight"
    assert len(set(rx.ids("/slow"))) < len(ids), "the test meant to kill the primary before the end"

    again = start(start_cluster, config)
    wait_for(lambda: received_all(rx, "/slow", ids), 30, "every event after the restart")

    def all_delivered() -> bool:
        found = rows(again, "slow")
        return len(found) == len(ids) and all(d["status"] == "delivered" for d in found)

    wait_for(all_delivered, 10, "every delivery recorded delivered")
    assert sorted(d["event_id"] for d in deliveries(again, "slow")) == sorted(ids)
    time.sleep(0.3)
    requests = rx.requests("/slow")
    seen = Counter(r.id for r in requests)
    assert set(seen) == set(ids)
    duplicated = {event_id for event_id, n in seen.items() if n > 1}
    assert unanswered <= duplicated, "a delivery in flight at the kill was not sent again"
    assert len(duplicated) <= concurrency, f"{len(duplicated)} ids sent twice: more than were in flight"
    assert max(seen.values()) <= 2
    for event_id in duplicated:
        copies = [r for r in requests if r.id == event_id]
        assert len({r.body for r in copies}) == 1
    assert all(r.signature_ok for r in requests)


# ---------------------------------------------------------------------------- 9. secrets


def test_the_secret_is_never_printed(start_cluster, rx):
    rx.answer("/ops", Answer(500), then=Answer(200))
    cluster = start(start_cluster, hook("ops", rx.url("/ops"), events=("app.*", "worker.*")), workers=2)
    ids = emit_via(cluster, "app.secretive", n=3)["ids"]
    os.kill(cluster.status()["workers"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: received_all(rx, "/ops", ids), 15, "deliveries")
    wait_for(lambda: "worker.crashed" in {r.json()["type"] for r in rx.requests("/ops")}, 15, "worker.crashed")
    assert all(r.signature_ok for r in rx.requests("/ops")), "the secret from env: is the signing key"

    config = str(cluster.cwd / "clusterctl-0.toml")
    outputs = {
        "status --json": cluster.cli("status", "--json"),
        "webhooks --json": cluster.cli("webhooks", "--json"),
        "webhooks": cluster.cli("webhooks"),
        "check": cluster.cli("check", "--config", config),
    }
    texts = {name: result.stdout + result.stderr for name, result in outputs.items()}
    assert all(result.returncode == 0 for result in outputs.values()), texts
    assert "env:TEST_HOOK_SECRET" in (cluster.cwd / "clusterctl-0.toml").read_text()
    assert cluster.cli("stop").returncode == 0
    texts["primary output"] = cluster.output()
    assert "worker.crashed" in texts["primary output"]
    logs = cluster.db.parent / "logs"
    for path in logs.glob("*.log*"):
        texts[str(path)] = path.read_text(errors="replace")
    assert any(name.endswith("workers.log") for name in texts), sorted(texts)
    for path in cluster.db.parent.glob("state.db*"):
        texts[str(path)] = path.read_bytes().decode("latin-1")
    for name, text in texts.items():
        assert SECRET_B64 not in text, f"the secret is in {name}"


def test_a_missing_env_secret_stops_up_naming_the_variable_only(start_cluster, rx, tmp_path):
    config = hook("a", rx.url("/a")) + hook("b", rx.url("/b")).replace("TEST_HOOK_SECRET", "MISSING_HOOK_SECRET_7")
    cluster = start_cluster(app="emit_app:app", workers=1, config=config, env=ENV, wait=False)
    assert cluster.proc.wait(20) == 2
    output = cluster.output()
    assert "MISSING_HOOK_SECRET_7" in output and "'b'" in output, output
    assert SECRET_B64 not in output
    assert "Traceback" not in output
    assert rx.requests() == []

    # A config error next to an inline secret does not echo it either.
    inline = tmp_path / "inline.toml"
    inline.write_text(hook("c", rx.url("/c"), max_attempts=0).replace("env:TEST_HOOK_SECRET", SECRET))
    result = cluster.cli("check", "--config", str(inline))
    assert result.returncode == 2 and "max_attempts" in result.stderr, result.stderr
    assert SECRET_B64 not in result.stdout + result.stderr


# ---------------------------------------------------------------------------- 10. listing without a primary


def test_webhooks_listing_works_with_no_primary_running(start_cluster, rx):
    rx.answer("/down", then=Answer(503))
    cluster = start(start_cluster, hook("up", rx.url("/up")), hook("down", rx.url("/down"), max_attempts=1))
    ids = emit_via(cluster, "app.listed", n=2)["ids"]
    wait_for(lambda: received_all(rx, "/up", ids) and received_all(rx, "/down", ids), 15, "deliveries")
    wait_for(
        lambda: all(d["status"] in ("delivered", "dead") for d in rows(cluster, "up") + rows(cluster, "down")),
        10,
        "outcomes recorded",
    )
    result = cluster.cli("stop")
    assert result.returncode == 0, result.stderr
    assert cluster.proc.wait(10) == 0

    result = cluster.cli("webhooks")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ENDPOINT" in lines[0] and "STATUS" in lines[0]
    listed = [line.split() for line in lines[1:]]
    assert sorted((r[1], r[2], r[3]) for r in listed) == [
        ("down", "app.listed", "dead"),
        ("down", "app.listed", "dead"),
        ("up", "app.listed", "delivered"),
        ("up", "app.listed", "delivered"),
    ], result.stdout
    assert "HTTP 503" in result.stdout
    only_up = cluster.cli("webhooks", "--endpoint", "up")
    assert only_up.returncode == 0 and "down" not in only_up.stdout and only_up.stdout.count("delivered") == 2


# ---------------------------------------------------------------------------- CLI: options before `replay`


def test_replay_keeps_options_given_before_the_subcommand(tmp_path):
    db = tmp_path / "state.db"
    store = Store(db)
    store.sync_endpoints(
        [{"name": name, "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 1} for name in ("a", "b")]
    )
    store.emit("msg_replay_test", "app.x", "{}", ["a", "b"])
    for row in store.deliveries():
        store.finish_delivery(row["id"], 1, "dead", 500, "HTTP 500", None)
    store.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "runtime", *args]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=30)

    # `--endpoint a` before `replay` must not widen the replay to every endpoint.
    result = cli("webhooks", "--endpoint", "a", "replay", "--since", "2000-01-01T00:00:00Z", "--db", str(db))
    assert result.returncode == 0, result.stderr
    store = Store(db)
    try:
        replayed = [d["endpoint"] for d in store.deliveries() if d["replay_of"] is not None]
    finally:
        store.close()
    assert replayed == ["a"], f"replayed deliveries of {replayed}"
    # `--db` before `replay` must find the store (cwd has none).
    result = cli("webhooks", "--db", str(db), "replay", "1")
    assert result.returncode == 0, result.stderr
