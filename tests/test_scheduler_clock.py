"""Catch-up and slot claiming with an injected clock and a real store (no waiting for real time)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from runtime.config import JobConfig
from runtime.cron import to_iso
from runtime.events import EventBus
from runtime.scheduler import Scheduler
from runtime.store import AsyncStore, Store

NOW = datetime(2026, 11, 22, 12, 0, 30, tzinfo=UTC)


def rows(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT scheduled_for, trigger, status, output FROM job_runs ORDER BY scheduled_for"
        ).fetchall()
    finally:
        conn.close()


def run_catch_up(tmp_path, catch_up: str, down_for: timedelta, paused: bool = False):
    db = tmp_path / "state.db"
    store = Store(db)
    store.mark_slot("every-minute", to_iso(NOW - down_for))
    if paused:
        store.set_paused("every-minute", True)
    store.close()
    job = JobConfig(name="every-minute", schedule="* * * * *", command=("true",), catch_up=catch_up)
    events = EventBus()

    async def scenario():
        async_store = AsyncStore(Store(db, clock=NOW.timestamp))
        scheduler = Scheduler(
            (job,), async_store, events, {"CLUSTERCTL_PRIMARY_PID": str(os.getpid())}, os.getpid(), now=lambda: NOW
        )
        await scheduler.start()
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            done = [r for r in rows(db) if r[2] != "running"]
            if len(done) >= expected:
                break
            await asyncio.sleep(0.02)
        await scheduler.stop()
        async_store.close()

    expected = int(down_for.total_seconds() // 60)
    asyncio.run(scenario())
    return rows(db)


@pytest.mark.parametrize(
    "catch_up, ran",
    [("none", 0), ("latest", 1), ("all", 10)],
)
def test_missed_slots_are_recorded_and_run_by_policy(tmp_path, catch_up, ran):
    result = run_catch_up(tmp_path, catch_up, timedelta(minutes=10))
    slots = [r[0] for r in result]
    expected = [to_iso(NOW.replace(second=0) - timedelta(minutes=m)) for m in range(9, -1, -1)]
    assert slots == expected  # every missed minute has a row: nothing silently lost
    assert all(r[1] == "catch_up" for r in result)
    succeeded = [r for r in result if r[2] == "succeeded"]
    skipped = [r for r in result if r[2] == "skipped"]
    assert len(succeeded) == ran and len(skipped) == 10 - ran
    assert all("missed while no primary was running" in r[3] for r in skipped)
    if catch_up == "latest":
        assert succeeded[0][0] == expected[-1]


def test_a_paused_job_catches_up_nothing(tmp_path):
    result = run_catch_up(tmp_path, "all", timedelta(minutes=3), paused=True)
    assert [r[2] for r in result] == ["skipped"] * 3
    assert all("paused" in r[3] for r in result)


def test_a_slot_is_claimed_once_across_stores(tmp_path):
    db = tmp_path / "state.db"
    first, second = Store(db), Store(db)
    slot = to_iso(NOW)
    assert first.claim_slot("job", slot, "schedule", 1)[0] == "claimed"
    assert second.claim_slot("job", slot, "schedule", 2) == ("lost", None, [])
    outcome, _, running = second.claim_slot("job", to_iso(NOW + timedelta(seconds=1)), "schedule", 2, "skip")
    assert outcome == "skipped" and len(running) == 1


def test_retention_keeps_the_newest_runs_per_job(tmp_path):
    store = Store(tmp_path / "state.db", clock=NOW.timestamp)
    for i in range(30):
        for job in ("a", "b"):
            _, run_id, _ = store.claim_slot(job, to_iso(NOW + timedelta(seconds=i)), "schedule", 1)
            store.finish_attempt(run_id, 1, to_iso(NOW), "succeeded", 0, "", True)
    _, old_id, _ = store.claim_slot("a", "2000-01-01T00:00:00.000Z", "schedule", 1)
    store.finish_attempt(old_id, 1, "2000-01-01T00:00:00.000Z", "succeeded", 0, "", True)
    store.prune_job_runs(keep_runs=10, keep_days=365 * 100)
    counts = dict(store.conn.execute("SELECT job, COUNT(*) FROM job_runs GROUP BY job").fetchall())
    assert counts == {"a": 10, "b": 10}
    assert store.conn.execute("SELECT COUNT(*) FROM job_attempts").fetchone()[0] == 20
    store.prune_job_runs(keep_runs=100, keep_days=1)
    assert store.conn.execute("SELECT COUNT(*) FROM job_runs WHERE scheduled_for < '2001'").fetchone()[0] == 0
    assert store.conn.execute("SELECT COUNT(*) FROM job_runs").fetchone()[0] == 19
    # A day later by the store's clock, every run is past keep_days: the date of the test run never matters.
    store.clock = (NOW + timedelta(days=2)).timestamp
    store.prune_job_runs(keep_runs=100, keep_days=1)
    assert store.conn.execute("SELECT COUNT(*) FROM job_runs").fetchone()[0] == 0
