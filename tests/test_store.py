"""The store's promises, proven once for each backend: SQLite (a file) and PostgreSQL (a real server).

Every test takes the `backend` fixture, parametrised over both, and opens the
store through the same factory the primary uses. Several handles on one store
stand for several primaries; threads and processes race where the promise is
about racing. Time comes from a clock the test moves, so leases and heartbeats
age without waiting.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import open_together

from runtime import ConfigError, EmitError, emit, load_settings
from runtime.store import SqlStore, StoreError, open_store_url, redact_url, store_label

T0 = 1_800_000_000.0  # 2027-01-15: "now" for every store in a test, moved by the test
ENDPOINT = {"name": "ops", "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 3}


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    where: str  # a path or a URL, as CLUSTERCTL_DB carries it; empty (no schema) when the test starts
    clock: Clock = field(default_factory=Clock)
    opened: list[SqlStore] = field(default_factory=list)

    def open(self, prepare: bool = True) -> SqlStore:
        """Another handle on the store: another primary, as far as the store can tell."""
        store = open_store_url(self.where, clock=self.clock, prepare=prepare)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    where = request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "state.db")
    backend = Backend(request.param, where)
    yield backend
    for store in backend.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> SqlStore:
    store = backend.open()
    store.sync_endpoints([ENDPOINT])
    return store


def slot(n: int) -> str:
    return f"2027-01-15T08:00:{n:02d}.000Z"


# ---------------------------------------------------------------------------- slots


def test_a_slot_is_claimed_by_one_primary_only(backend: Backend, store: SqlStore) -> None:
    other = backend.open()
    assert store.claim_slot("tick", slot(0), "schedule", 101)[0] == "claimed"
    assert other.claim_slot("tick", slot(0), "schedule", 202) == ("lost", None, [])
    assert other.record_skipped("tick", slot(0), "catch_up", "missed", 202) is False
    (row,) = store.job_history("tick")
    assert (row["scheduled_for"], row["status"], row["trigger"]) == (slot(0), "running", "schedule")
    assert other.job_run(row["id"])["primary_pid"] == 101


def test_primaries_racing_for_the_same_slots_claim_each_exactly_once(backend: Backend, store: SqlStore) -> None:
    stores = [backend.open() for _ in range(4)]
    go = threading.Barrier(len(stores))
    won: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def primary(index: int, handle: SqlStore) -> None:
        try:
            go.wait(10)
            for n in range(15):
                outcome, run_id, _ = handle.claim_slot("race", slot(n), "schedule", 1000 + index, "allow")
                if outcome == "claimed":
                    won.append((n, str(run_id)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=primary, args=(i, s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(n for n, _ in won) == list(range(15)), "every slot claimed, none twice"
    rows = store.job_history("race", limit=100)
    assert Counter(r["scheduled_for"] for r in rows) == Counter(slot(n) for n in range(15))


def test_overlap_skip_sees_a_run_another_primary_started(backend: Backend, store: SqlStore) -> None:
    other = backend.open()
    _, first, _ = store.claim_slot("long", slot(0), "schedule", 101, "skip")
    outcome, second, running = other.claim_slot("long", slot(1), "schedule", 202, "skip")
    assert (outcome, running) == ("skipped", [first])
    assert "still running" in other.job_run(second)["output"]
    # A run its own primary knows has ended, though the store has not taken the outcome yet.
    assert store.claim_slot("long", slot(2), "schedule", 101, "skip", finished=(first,))[0] == "claimed"


def test_missed_slots_are_recorded_once_and_the_newest_slot_is_remembered(store: SqlStore) -> None:
    assert store.record_skipped("tick", slot(3), "catch_up", "missed: the store was unavailable", 101) is True
    assert store.record_skipped("tick", slot(3), "catch_up", "again", 101) is False
    assert store.claim_slot("tick", slot(3), "catch_up", 101)[0] == "lost"
    store.mark_slot("tick", slot(1))  # an older slot never moves it back
    assert store.last_slot("tick") == slot(3)
    (row,) = store.job_history("tick")
    assert (row["status"], row["output"]) == ("skipped", "missed: the store was unavailable")


def test_finished_runs_paused_jobs_and_pruning(backend: Backend, store: SqlStore) -> None:
    for n in range(5):
        _, run_id, _ = store.claim_slot("tick", slot(n), "schedule", 101)
        store.finish_attempt(run_id, 1, slot(n), "succeeded", 0, f"run {n}", True)
    store.set_paused("tick", True)
    assert store.paused_jobs() == {"tick"} and store.last_statuses() == {"tick": "succeeded"}
    assert store.prune_job_runs(keep_runs=2, keep_days=365) == 3
    assert [r["scheduled_for"] for r in backend.open().job_history("tick")] == [slot(4), slot(3)]


def test_runs_of_dead_primaries_are_abandoned_by_host(backend: Backend, store: SqlStore) -> None:
    here = [store.claim_slot("here", slot(n), "schedule", pid)[1] for n, pid in ((0, 101), (1, 102))]
    elsewhere = backend.open()
    elsewhere.host = "web-2"  # a primary on another host: its pids mean nothing here
    alive_there = elsewhere.claim_slot("there", slot(0), "schedule", 201)[1]
    dead_there = elsewhere.claim_slot("there", slot(1), "schedule", 202)[1]
    elsewhere.heartbeat(201, "10.0.0.2:8000", 2, "0.1.0", slot(0))
    abandoned = store.abandon_runs(lambda pid: pid == 102, "\n[abandoned]")
    assert sorted(abandoned) == sorted([here[0], dead_there])
    statuses = {r["id"]: r["status"] for r in store.job_history(limit=10)}
    assert statuses == {here[0]: "abandoned", here[1]: "running", alive_there: "running", dead_there: "abandoned"}


# ---------------------------------------------------------------------------- webhooks


def emit_events(store: SqlStore, count: int, prefix: str = "msg") -> list[str]:
    ids = [f"{prefix}_{n:04d}" for n in range(count)]
    for event_id in ids:
        store.emit(event_id, "app.test", json.dumps({"id": event_id}), ["ops"])
    return ids


def test_a_lease_keeps_a_delivery_from_other_primaries_until_it_runs_out(backend: Backend, store: SqlStore) -> None:
    ids = emit_events(store, 10)
    other = backend.open()
    mine = store.lease_deliveries("ops", 101, 4, lease_seconds=30)
    theirs = other.lease_deliveries("ops", 202, 100, lease_seconds=30)
    assert [d["event_id"] for d in mine] == ids[:4]
    assert [d["event_id"] for d in theirs] == ids[4:]
    assert other.lease_deliveries("ops", 202, 100, lease_seconds=30) == []
    store.finish_delivery(mine[0]["id"], 1, "delivered", 200, None, None)
    backend.clock.now += 31  # the first primary died holding three leases: they run out
    taken = other.lease_deliveries("ops", 202, 100, lease_seconds=30)
    assert sorted(d["event_id"] for d in taken) == sorted(ids[1:4] + ids[4:])
    assert taken[0]["payload"] == json.dumps({"id": taken[0]["event_id"]})


def test_primaries_leasing_at_once_never_get_the_same_delivery(backend: Backend, store: SqlStore) -> None:
    ids = emit_events(store, 300)
    stores = [backend.open() for _ in range(3)]
    got: list[str] = []
    errors: list[BaseException] = []
    go = threading.Barrier(len(stores))

    def primary(pid: int, handle: SqlStore) -> None:
        try:
            go.wait(10)
            while batch := handle.lease_deliveries("ops", pid, 7, lease_seconds=30):
                got.extend(d["event_id"] for d in batch)
                for delivery in batch:
                    handle.finish_delivery(delivery["id"], 1, "delivered", 200, None, None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=primary, args=(300 + i, s)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert Counter(got) == Counter(ids), "each delivery leased exactly once"
    assert store.webhook_counts() == {"pending": 0, "failed": 0, "delivered": 300, "dead": 0}


def test_a_dead_primarys_leases_on_this_host_are_released_at_once(backend: Backend, store: SqlStore) -> None:
    emit_events(store, 4)
    store.lease_deliveries("ops", 101, 2, lease_seconds=30)
    elsewhere = backend.open()
    elsewhere.host = "web-2"
    elsewhere.lease_deliveries("ops", 201, 2, lease_seconds=30)
    # Both pids are dead as far as this host can tell; only its own primary's leases are known to be free.
    assert store.release_leases(lambda pid: False) == 2
    assert len(backend.open().lease_deliveries("ops", 303, 10, lease_seconds=30)) == 2


def test_outcomes_replays_and_endpoints(backend: Backend, store: SqlStore) -> None:
    (event_id,) = emit_events(store, 1)
    (delivery,) = store.lease_deliveries("ops", 101, 1, lease_seconds=30)
    store.finish_delivery(delivery["id"], 1, "failed", 500, "HTTP 500", 60)
    assert store.lease_deliveries("ops", 101, 1, lease_seconds=30) == [], "not due before its back-off"
    backend.clock.now += 61
    (again,) = store.lease_deliveries("ops", 101, 1, lease_seconds=30)
    store.finish_delivery(again["id"], 2, "dead", 500, "HTTP 500", None)
    (replayed,) = store.replay(delivery_id=delivery["id"])
    listed = {d["id"]: d for d in backend.open().deliveries()}
    assert listed[replayed]["event_id"] == event_id and listed[replayed]["replay_of"] == delivery["id"]
    assert store.webhook_counts() == {"pending": 1, "failed": 1, "delivered": 0, "dead": 1}
    assert store.endpoint_counts() == {"ops": {"dead": 1, "pending": 1}}
    store.sync_endpoints([{**ENDPOINT, "name": "billing"}])
    endpoints = {e["name"]: e for e in backend.open().endpoints()}
    assert endpoints["billing"]["enabled"] and not endpoints["ops"]["enabled"]
    assert endpoints["ops"]["disabled_reason"] == "removed from the config"
    assert store.kill_queue("ops", "gone") == 1


def test_emit_writes_to_the_store_it_is_given(backend: Backend, store: SqlStore) -> None:
    event_id = emit("app.order_created", {"order": 7}, db=backend.where)
    (delivery,) = store.lease_deliveries("ops", 101, 5, lease_seconds=30)
    assert (delivery["event_id"], json.loads(delivery["payload"])) == (event_id, {"order": 7})


# ---------------------------------------------------------------------------- primaries


def test_heartbeats_list_the_live_primaries(backend: Backend, store: SqlStore) -> None:
    store.heartbeat(101, "127.0.0.1:8000", 2, "0.1.0", slot(0))
    backend.clock.now += 5
    elsewhere = backend.open()
    elsewhere.host = "web-2"
    elsewhere.heartbeat(201, "10.0.0.2:8000", 4, "0.1.0", slot(1))
    live = store.live_primaries(within=6)
    assert [(p["host"], p["pid"], p["workers_ready"]) for p in live] == sorted(
        [(store.host, 101, 2), ("web-2", 201, 4)]
    )
    assert [p["pid"] for p in store.live_primaries(within=3)] == [201], "101's heartbeat is 5 s old"
    elsewhere.forget_primary(201)
    assert store.live_primaries(within=6) == [live[0] if live[0]["pid"] == 101 else live[1]]


# ---------------------------------------------------------------------------- opening


def test_primaries_creating_the_schema_at_the_same_moment_all_succeed(backend: Backend, tmp_path: Path) -> None:
    failures = open_together(backend.where, tmp_path / "go", 6)
    assert failures == [], f"{len(failures)} of 6 failed:\n{failures[0]}"
    store = backend.open(prepare=False)  # an emitter's open: the schema must be complete
    store.sync_endpoints([ENDPOINT])
    assert emit_events(store, 1) == ["msg_0000"]


def test_an_emitter_does_not_create_the_schema(backend: Backend) -> None:
    with pytest.raises(StoreError) as info:
        backend.open(prepare=False)
    assert store_label(backend.where) in str(info.value)
    with pytest.raises(EmitError):
        emit("app.early", db=backend.where)


# ---------------------------------------------------------------------------- PostgreSQL only


def test_a_url_never_shows_its_password() -> None:
    url = "postgresql://app:s3cret-pw@db.internal:5432/app?sslmode=require&password=s3cret-pw"
    assert "s3cret" not in redact_url(url)
    assert redact_url(url) == "postgresql://app:***@db.internal:5432/app?sslmode=require&password=***"
    assert redact_url("postgresql://app@db.internal/app") == "postgresql://app@db.internal/app"


def test_a_store_url_in_the_config_is_checked_and_never_echoed(tmp_path: Path) -> None:
    path = tmp_path / "clusterctl.toml"
    path.write_text('[store]\nurl = "mysql://app:s3cret-pw@db/app"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "[store] url" in str(info.value) and "s3cret" not in str(info.value)
    path.write_text('[store]\nurl = "postgresql://app:s3cret-pw@db/app"\npath = "here/state.db"\n')
    store = load_settings(path, cwd=tmp_path).store
    assert store.db == "postgresql://app:s3cret-pw@db/app" and store.path == tmp_path / "here" / "state.db"
    assert "s3cret" not in store.label + repr(store)


def test_a_refused_connection_is_an_error_that_names_the_store_without_its_password(pg_server: str) -> None:
    wrong = pg_server.replace("@", "-not-it@", 1)  # the right user, a wrong password
    password = wrong.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    with pytest.raises(StoreError) as info:
        open_store_url(wrong)
    assert password not in str(info.value) and "***" in str(info.value), info.value
    with pytest.raises(EmitError) as emitted:
        emit("app.x", db=wrong)
    assert password not in str(emitted.value) and "NOT recorded" in str(emitted.value)


def test_a_connection_the_server_dropped_is_replaced_on_the_next_call(pg_url: str) -> None:
    import psycopg

    store = open_store_url(pg_url)
    try:
        store.sync_endpoints([ENDPOINT])
        backend_pid = store._execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        # Idle when it was dropped: the next call notices at its BEGIN, before anything ran, and goes on.
        assert [e["name"] for e in store.endpoints()] == ["ops"]
        assert store._execute("SELECT pg_backend_pid()").fetchone()[0] != backend_pid
    finally:
        store.close()
