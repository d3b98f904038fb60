"""The store against other processes and users: concurrent opens, held locks, a deleted file, file modes.

Real processes and real SQLite files; every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, get, open_together, wait_for

from runtime import EmitError, emit, emit_async
from runtime.logs import LogLine, WorkerLogs
from runtime.store import Store

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ENDPOINT = {"name": "all", "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 3}


def store_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def schema(db: Path) -> set[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return set(conn.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())
    finally:
        conn.close()


def event_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM webhook_events")}
    finally:
        conn.close()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual 022, so a file that is private is private because we made it so (children inherit it)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- 1. primaries opening one fresh store


def test_processes_opening_a_fresh_store_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    reference = tmp_path / "reference.db"
    Store(reference).close()
    expected = schema(reference)
    for attempt in range(5):
        db = tmp_path / f"round-{attempt}" / "state.db"  # the directory does not exist yet either
        failures = open_together(str(db), tmp_path / f"go-{attempt}", 8)
        assert failures == [], f"round {attempt}: {len(failures)} of 8 failed:\n{failures[0]}"
        assert schema(db) == expected, f"round {attempt}: the schema is not complete"
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
        finally:
            conn.close()


# ---------------------------------------------------------------------------- 2. emit() and a locked store


@pytest.fixture
def store_db(tmp_path: Path) -> Path:
    db = tmp_path / "state.db"
    store = Store(db)
    store.sync_endpoints([ENDPOINT])
    store.close()
    return db


@pytest.fixture
def write_lock(store_db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the store's write lock until the test rolls it back."""
    conn = sqlite3.connect(store_db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    conn.close()


def test_emit_inside_an_event_loop_fails_fast_on_a_locked_store_and_says_so(
    store_db: Path, write_lock: sqlite3.Connection
) -> None:
    async def view() -> tuple[float, str]:
        started = time.monotonic()
        with pytest.raises(EmitError) as info:
            emit("app.locked", {"n": 1}, db=store_db)
        return time.monotonic() - started, str(info.value)

    elapsed, message = asyncio.run(view())
    assert elapsed < 1.0, f"emit() held the event loop for {elapsed:.1f}s"
    assert str(store_db) in message and "NOT recorded" in message, message
    write_lock.execute("ROLLBACK")
    assert event_ids(store_db) == set()


def test_emit_async_waits_for_the_lock_without_blocking_the_loop(
    store_db: Path, write_lock: sqlite3.Connection
) -> None:
    async def view() -> tuple[str, int]:
        task = asyncio.ensure_future(emit_async("app.async", {"n": 2}, db=store_db))
        ticks = 0
        while ticks < 10:  # the loop keeps running while the write waits for the lock
            await asyncio.sleep(0.05)
            ticks += 1
        assert not task.done(), "emit_async returned while another connection held the write lock"
        write_lock.execute("ROLLBACK")
        return await asyncio.wait_for(task, 10), ticks

    started = time.monotonic()
    event_id, ticks = asyncio.run(view())
    assert ticks == 10 and time.monotonic() - started < 5
    assert event_ids(store_db) == {event_id}


def test_emit_from_a_plain_thread_waits_for_the_lock(store_db: Path, write_lock: sqlite3.Connection) -> None:
    result: dict[str, object] = {}

    def app_thread() -> None:
        try:
            result["id"] = emit("app.threaded", {"n": 3}, db=store_db)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=app_thread)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not result, f"emit() did not wait for the lock: {result}"
    write_lock.execute("ROLLBACK")
    thread.join(10)
    assert "error" not in result, result
    assert event_ids(store_db) == {result["id"]}


# ---------------------------------------------------------------------------- 3. the store file deleted under a primary


def webhook_config(url: str) -> str:
    return (
        f'[[webhooks]]\nname = "ops"\nurl = {json.dumps(url)}\nevents = ["app.*"]\n'
        'secret = "env:TEST_HOOK_SECRET"\nretry_base = 60\n'
    )


def emit_in_worker(port: int) -> str:
    code, body = get(port, "/emit?type=app.after")
    assert code == 200, body
    return json.loads(body)["ids"][0]


def test_a_deleted_store_file_is_reported_and_replaced_and_no_event_is_lost(start_cluster, open_umask: None) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hook"
    cluster = start_cluster(
        app="emit_app:app", workers=1, config=webhook_config(closed), env={"TEST_HOOK_SECRET": SECRET}
    )
    before = emit_in_worker(cluster.port)  # the worker's emit() connection is open on the old file
    assert before in event_ids(cluster.db)
    for path in store_files(cluster.db):
        path.unlink(missing_ok=True)

    error = wait_for(lambda: cluster.status()["store_error"], 10, "status to report the deleted store")
    assert str(cluster.db) in error and "deleted" in error, error
    wait_for(lambda: cluster.db.exists(), 10, "a new store file at the same path")

    returned: list[str] = []

    def landed() -> bool:
        returned.append(emit_in_worker(cluster.port))  # a 500 (EmitError) is loud, so allowed: it is retried
        try:
            return returned[-1] in event_ids(cluster.db)
        except sqlite3.Error as exc:  # the new file may not have its tables yet
            raise AssertionError(exc) from None

    wait_for(landed, 15, "an event emitted by the app to land in the new file")
    emitted_after = set(returned) | {emit_in_worker(cluster.port) for _ in range(5)}
    assert emitted_after <= event_ids(cluster.db), "emit() returned ids that are not in the live store file"
    assert before not in event_ids(cluster.db)

    conn = sqlite3.connect(f"file:{cluster.db}?mode=ro", uri=True)
    try:
        endpoints = [row[0] for row in conn.execute("SELECT name FROM webhook_endpoints WHERE enabled = 1")]
        routed = {row[0] for row in conn.execute("SELECT event_id FROM webhook_deliveries WHERE endpoint = 'ops'")}
    finally:
        conn.close()
    assert endpoints == ["ops"], "the endpoints were not published to the new store"
    assert emitted_after <= routed, "events in the new store have no delivery to the configured endpoint"
    assert {path.name: mode(path) for path in store_files(cluster.db)} == dict.fromkeys(
        ["state.db", "state.db-wal", "state.db-shm"], 0o600
    )
    assert "store.replaced" in cluster.output()
    assert cluster.proc.poll() is None, cluster.output()


# ---------------------------------------------------------------------------- 4. who may read the store and the logs


def modes_after_a_start(start_cluster, db: Path) -> dict[str, int]:
    start_cluster(app="chatty_app:app", workers=1, db=db)  # it prints at import; the primary records its spawn
    log = db.parent / "logs" / "workers.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 15, "worker output in workers.log")
    wait_for(lambda: all(p.exists() for p in store_files(db)), 15, "the store, its WAL and its shm")
    return {p.name: mode(p) for p in [*store_files(db), log.parent, log]}


def test_a_new_store_and_worker_log_are_private(start_cluster, tmp_path: Path, open_umask: None) -> None:
    db = tmp_path / "fresh" / "state.db"
    expected = {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600, "logs": 0o700, "workers.log": 0o600}
    assert modes_after_a_start(start_cluster, db) == expected


def test_a_store_and_logs_left_readable_are_tightened_at_start(start_cluster, tmp_path: Path, open_umask: None) -> None:
    db = tmp_path / "old" / "state.db"
    Store(db).close()
    logs = db.parent / "logs"
    logs.mkdir()
    (logs / "workers.log").write_text("from an older version\n")
    for path in [db, logs / "workers.log"]:
        path.chmod(0o644)
    logs.chmod(0o755)
    expected = {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600, "logs": 0o700, "workers.log": 0o600}
    assert modes_after_a_start(start_cluster, db) == expected


def test_a_rotated_worker_log_stays_private(tmp_path: Path, open_umask: None, monkeypatch) -> None:
    monkeypatch.setattr("runtime.logs.MAX_BYTES", 512)
    logs = WorkerLogs(tmp_path / "logs")
    try:
        for n in range(50):
            logs.add(LogLine(1, 100, "out", f"line {n} " + "x" * 40))
        rotated = tmp_path / "logs" / "workers.log.1"
        wait_for(lambda: rotated.exists() and (tmp_path / "logs" / "workers.log").exists(), 10, "a rotation")
    finally:
        logs.close()
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) >= 2
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
