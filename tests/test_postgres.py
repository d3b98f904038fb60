"""Primaries on one PostgreSQL database, end to end: real primaries, real jobs, a real server.

Each primary has its own directory (`--db`: its control socket and logs, as on
a host of its own) and the same `[store] url`, a fresh database per test on
the server `tests/pg.sh` starts. The jobs write what they ran to files; the
receiver (tests/receiver.py) records which primary sent each webhook. Every
wait is a poll with a deadline; the measured figures are printed (`-s`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import Cluster, Load, get, wait_for
from receiver import Answer, Receiver
from test_jobs import assert_no_gap, read_lines, slot_time

from runtime import EmitError, emit
from runtime.store import SqlStore, open_store_url

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ENV = {"TEST_HOOK_SECRET": SECRET}
# Writes the slot and the primary that ran it, after emitting an event from the job: jobs get the store's
# URL in CLUSTERCTL_DB, so emit() writes to PostgreSQL.
TICK = (
    "import os, sys; from runtime import emit; slot = os.environ['CLUSTERCTL_SCHEDULED_FOR'];"
    " emit('app.tick', {'slot': slot});"
    " open(sys.argv[1], 'a').write(slot + ' ' + os.environ['CLUSTERCTL_PRIMARY_PID'] + chr(10))"
)


def password_of(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def config(url: str, *, job: str | None = None, hook: str | None = None, **hook_keys: Any) -> str:
    text = f"[store]\nurl = {json.dumps(url)}\n\n"
    if job:
        text += f'[[jobs]]\nname = "tick"\nschedule = "* * * * * *"\ncommand = {json.dumps(job)}\ncatch_up = "none"\n\n'
    if hook:
        keys = {"retry_base": 0.1, **hook_keys}
        text += f'[[webhooks]]\nname = "rx"\nurl = {json.dumps(hook)}\nevents = ["app.*"]\n'
        text += 'secret = "env:TEST_HOOK_SECRET"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return text


class Fleet:
    """Primaries that share one database, each with a directory of its own (its "host")."""

    def __init__(self, start_cluster: Callable[..., Cluster], tmp_path: Path, url: str, text: str) -> None:
        self.start_cluster = start_cluster
        self.tmp_path = tmp_path
        self.url = url
        self.config = tmp_path / "shared.toml"
        self.config.write_text(text)
        self.members: list[Cluster] = []

    def start(self, count: int, wait: bool = True) -> list[Cluster]:
        started = []
        for _ in range(count):
            db = self.tmp_path / f"host-{len(self.members)}" / "state.db"
            cluster = self.start_cluster(
                "--config", str(self.config), app="asgi_app:app", workers=1, db=db, env=ENV, wait=False
            )
            self.members.append(cluster)
            started.append(cluster)
        if wait:
            for cluster in started:
                up = wait_for(lambda c=cluster: c.proc.poll() is not None or c.settled(1), 40, "a primary up")
                assert up and cluster.proc.poll() is None, cluster.output()
        return started

    def cli(self, cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
        return cluster.cli(*args, "--config", str(self.config))

    def pids(self) -> set[int]:
        return {c.proc.pid for c in self.members}


@pytest.fixture
def store(pg_url: str) -> Iterator[Callable[[], SqlStore]]:
    """Read the shared database as the CLI does (never creating it)."""
    opened: list[SqlStore] = []

    def open_it() -> SqlStore:
        opened.append(open_store_url(pg_url, prepare=False))
        return opened[-1]

    yield open_it
    for handle in opened:
        handle.close()


def stop_all(fleet: Fleet) -> None:
    for cluster in fleet.members:
        if cluster.proc.poll() is None:
            result = cluster.cli("stop")
            assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- three primaries, one database


def test_three_primaries_run_every_slot_once_and_share_the_deliveries(start_cluster, tmp_path, pg_url, store):
    out = tmp_path / "ticks.txt"
    with Receiver(SECRET, who=True) as rx:
        text = config(pg_url, job=[sys.executable, "-c", TICK, str(out)], hook=rx.url("/all"), concurrency=2)
        fleet = Fleet(start_cluster, tmp_path, pg_url, text)
        fleet.start(3)
        all_up = datetime.now(UTC)

        # The fleet, as each primary's status lists it.
        def listed(cluster: Cluster) -> list[dict[str, Any]] | None:
            primaries = cluster.status()["primaries"]
            return primaries if {p["pid"] for p in primaries} == fleet.pids() else None

        for cluster in fleet.members:
            primaries = wait_for(lambda c=cluster: listed(c), 15, "all three primaries in status")
            for row in primaries:
                assert set(row) >= {"host", "pid", "bind", "workers_ready", "last_seen"}
                assert row["workers_ready"] == 1 and row["bind"].startswith("127.0.0.1:")
        status_text = fleet.members[0].cli("status").stdout
        assert "3 primaries share the store" in status_text, status_text

        burst = [emit("app.burst", {"n": n}, db=pg_url) for n in range(300)]
        wait_for(
            lambda: len([line for line in read_lines(out) if slot_time(line[0]) > all_up]) >= 20,
            45,
            "20 slots with all three primaries up",
        )
        ticks = set()
        with_store = store()

        def all_received() -> bool:
            ticks.update(e["event_id"] for e in with_store.deliveries(limit=10_000) if e["type"] == "app.tick")
            return set(burst) | ticks <= set(rx.ids("/all"))

        wait_for(all_received, 30, "every event delivered")
        stop_all(fleet)
        requests = rx.requests("/all")

    lines = read_lines(out)
    rows = sorted(store().job_history("tick", limit=10_000), key=lambda r: r["scheduled_for"])
    counts = Counter(line[0] for line in lines)
    assert max(counts.values()) == 1, f"a slot ran twice: {counts.most_common(3)}"
    assert_no_gap(rows)
    by_slot = {r["scheduled_for"]: r for r in rows}
    reader = store()
    for slot, pid in lines:  # run by the primary that claimed it (the last may have been ended by the stop)
        run = reader.job_run(by_slot[slot]["id"])
        assert run is not None and run["status"] != "skipped" and run["primary_pid"] == int(pid)
    assert {r["scheduled_for"] for r in rows if r["status"] == "succeeded"} <= set(counts)

    # Deliveries: each event exactly once, signed, and sent by more than one primary.
    received = Counter(r.id for r in requests)
    assert max(received.values()) == 1, f"delivered twice: {received.most_common(3)}"
    assert set(burst) | ticks <= set(received) <= {d["event_id"] for d in store().deliveries(limit=10_000)}
    assert all(r.signature_ok for r in requests)
    senders = Counter(r.sender_pid for r in requests)
    assert set(senders) <= fleet.pids() and len(senders) >= 2, senders
    print(f"\ndeliveries by primary: {dict(senders)}; slots run by primary: {Counter(p for _, p in lines)}")

    # History from any primary's config (each host's own --db directory, the shared database).
    for cluster in fleet.members:
        result = fleet.cli(cluster, "history", "--json", "--job", "tick", "--limit", "10000")
        assert result.returncode == 0, result.stderr
        assert sorted(r["id"] for r in json.loads(result.stdout)) == sorted(r["id"] for r in rows)
    texts = [status_text, result.stdout, *(c.output() for c in fleet.members)]
    assert not [t for t in texts if password_of(pg_url) in t], "the database password was printed"


# ---------------------------------------------------------------------------- a primary killed holding leases


def test_a_killed_primarys_leased_deliveries_are_delivered_by_another_after_the_lease(
    start_cluster, tmp_path, pg_url, store
):
    with Receiver(SECRET, who=True) as rx:
        rx.answer("/slow", then=Answer(200, delay=0.5))
        # The lease is the delivery timeout + 30 s: 31 s here.
        fleet = Fleet(start_cluster, tmp_path, pg_url, config(pg_url, hook=rx.url("/slow"), timeout=1, concurrency=4))
        (doomed,) = fleet.start(1)
        reader = store()
        wait_for(lambda: reader.endpoints(), 15, "the endpoint published (emit() fans out to it)")
        ids = [emit("app.leased", {"n": n}, db=pg_url) for n in range(200)]  # 25 s of work for one primary
        wait_for(lambda: len(rx.requests("/slow")) >= 6, 15, "the first primary delivering")
        (survivor,) = fleet.start(1)
        # Running (heartbeating) before the kill: a primary that starts after it frees the dead one's leases at
        # once (same host, pid gone), which is not what this test is about.
        wait_for(lambda: len(survivor.status()["primaries"]) == 2, 15, "both primaries heartbeating")
        os.kill(doomed.proc.pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        doomed.proc.wait(10)
        with psycopg.connect(pg_url) as conn:
            orphaned = {
                event_id: lease_until
                for event_id, lease_until in conn.execute(
                    "SELECT event_id, lease_until FROM webhook_deliveries WHERE leased_by = %s"
                    " AND status IN ('pending', 'failed')",
                    (doomed.proc.pid,),
                )
            }
        assert orphaned, "the primary was meant to die holding leases"

        def taken_over() -> list[Any]:
            got = [r for r in rx.requests("/slow") if r.id in orphaned and r.sender_pid == survivor.proc.pid]
            return got if {r.id for r in got} == set(orphaned) else []

        takeover = wait_for(taken_over, 60, "the survivor to deliver the dead primary's leased deliveries")
        took = max(r.at for r in takeover) - killed_at
        wait_for(lambda: set(ids) <= set(rx.ids("/slow")), 30, "every event delivered")
        stop_all(fleet)
    for request in takeover:
        until = slot_time(orphaned[request.id]).timestamp()
        assert request.wall >= until - 0.5, "a leased delivery was taken before its lease ran out"
    print(f"\ntakeover of {len(orphaned)} leased deliveries: {took:.1f} s after the kill (lease 31 s)")
    assert took < 31 + 10 and max(slot_time(u).timestamp() for u in orphaned.values()) > killed_wall


# ---------------------------------------------------------------------------- the database restarted under load


@pytest.fixture
def pg_ctl(pg_server: str) -> Iterator[Callable[..., None]]:
    """pg_ctl for the test server (tests/pg.sh); the server is running again when the test ends."""
    ctl = os.environ.get("CLUSTERCTL_TEST_PG_CTL")
    if not ctl:
        if os.environ.get("CI"):
            pytest.fail("CLUSTERCTL_TEST_PG_CTL is not set: .ci/run starts PostgreSQL with tests/pg.sh")
        pytest.skip("no pg_ctl for the test server (tests/pg.sh start exports CLUSTERCTL_TEST_PG_CTL)")

    def run(*args: str) -> None:
        subprocess.run([ctl, *args], check=True, capture_output=True, timeout=60)

    yield run
    if subprocess.run([ctl, "status"], capture_output=True, timeout=30).returncode != 0:
        run("start", "-w")


def test_a_database_restart_under_load_loses_no_slot_and_runs_none_twice(
    start_cluster, tmp_path, pg_url, store, pg_ctl
):
    out = tmp_path / "ticks.txt"
    fleet = Fleet(start_cluster, tmp_path, pg_url, config(pg_url, job=[sys.executable, "-c", TICK, str(out)]))
    first, second = fleet.start(2)
    with Load(first.port, clients=4) as load:
        wait_for(lambda: len(read_lines(out)) >= 3, 20, "a few slots before the outage")
        pg_ctl("stop", "-m", "fast", "-w")
        down = time.monotonic()
        with pytest.raises(EmitError) as info:
            emit("app.lost", {"n": 1}, db=pg_url)
        assert "NOT recorded" in str(info.value) and password_of(pg_url) not in str(info.value)
        for cluster in (first, second):
            error = wait_for(lambda c=cluster: c.status()["store_error"], 15, "status to say the store is down")
            assert "unreachable" in error and password_of(pg_url) not in error, error
        before = load.ok
        wait_for(lambda: time.monotonic() >= down + 5, 10, "5 s without the database", interval=0.1)
        assert load.ok - before > 50, "HTTP was not served while the database was down"
        pg_ctl("start", "-w")
        up = datetime.now(UTC)
        wait_for(lambda: emitted(pg_url), 15, "emit() to work again")
        for cluster in (first, second):
            wait_for(lambda c=cluster: c.status()["store_error"] is None, 20, "the store error to clear")
        wait_for(lambda: any(slot_time(line[0]) > up for line in read_lines(out)), 15, "a slot run after the outage")
    stop_all(fleet)
    assert load.failures == [], load.failures[:3]

    rows = sorted(store().job_history("tick", limit=10_000), key=lambda r: r["scheduled_for"])
    assert_no_gap(rows)
    counts = Counter(line[0] for line in read_lines(out))
    assert max(counts.values()) == 1, f"a slot ran twice: {counts.most_common(3)}"
    missed = [r for r in rows if r["trigger"] == "catch_up"]
    assert len(missed) >= 3, "the slots of the outage are recorded as not run"
    for row in missed:
        assert row["status"] == "skipped" and "missed: the store was unavailable" in row["output"], row
    # Also skipped: slots that found a run still `running` (its outcome waiting for the database; overlap = skip).
    assert not [r for r in rows if r["status"] == "skipped" and r["scheduled_for"] in counts], "a skipped slot ran"
    ran = {r["scheduled_for"] for r in rows if r["status"] != "skipped"}
    assert {r["scheduled_for"] for r in rows if r["status"] == "succeeded"} <= set(counts) <= ran


def emitted(url: str) -> str | None:
    try:
        return emit("app.back", {"n": 2}, db=url)
    except EmitError:
        return None


# ---------------------------------------------------------------------------- two primaries on an empty database


def test_two_primaries_starting_together_on_an_empty_database_both_come_up(start_cluster, tmp_path, pg_url):
    fleet = Fleet(start_cluster, tmp_path, pg_url, config(pg_url))
    both = fleet.start(2, wait=False)
    for cluster in both:
        up = wait_for(lambda c=cluster: c.proc.poll() is not None or c.settled(1), 40, "a primary up")
        assert up and cluster.proc.poll() is None, cluster.output()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM clusterctl_schema").fetchall() == [(1,)]
    wait_for(lambda: len(both[0].status()["primaries"]) == 2, 15, "both primaries listed")
    stop_all(fleet)


# ---------------------------------------------------------------------------- emit() from a worker


def test_a_workers_emit_writes_to_the_shared_database(start_cluster, tmp_path, pg_url):
    config_path = tmp_path / "emit.toml"
    config_path.write_text(config(pg_url, hook="http://127.0.0.1:9/hook"))
    cluster = start_cluster("--config", str(config_path), app="emit_app:app", workers=1, env=ENV)
    status, body = get(cluster.port, "/emit?type=app.shared")
    assert status == 200, body
    event_id = json.loads(body)["ids"][0]
    with psycopg.connect(pg_url) as conn:
        kinds = conn.execute("SELECT type FROM webhook_events WHERE id = %s", (event_id,)).fetchall()
        targets = conn.execute("SELECT endpoint FROM webhook_deliveries WHERE event_id = %s", (event_id,)).fetchall()
    assert kinds == [("app.shared",)] and targets == [("rx",)]
    assert not (cluster.db.parent / "state.db").exists() or event_id not in _sqlite_events(cluster.db)


def _sqlite_events(db: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM webhook_events")}
    except sqlite3.Error:
        return set()
    finally:
        conn.close()
