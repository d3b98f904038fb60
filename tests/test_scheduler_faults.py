"""The scheduler when the store or the event loop lets it down: a held write lock, a stalled loop.

A second SQLite connection holds the write lock (`BEGIN IMMEDIATE`) for longer than the store's
busy timeout, which the test shortens so a refused write fails in a fraction of a second.
Wall time comes from an injected clock that runs at the pace of the monotonic clock.
"""

from __future__ import annotations

import asyncio
import shlex
import sqlite3
import time
from datetime import UTC, datetime, timedelta

from test_scheduler_clock import SteppingClock, job_rows, scheduling, until

from runtime.config import JobConfig
from runtime.cron import from_iso
from runtime.events import Event, EventBus
from runtime.store import Store

START = datetime(2026, 11, 22, 12, 0, 0, 500_000, tzinfo=UTC)
EVERY_SECOND = "* * * * * *"
BUSY_TIMEOUT_MS = 200  # a write the lock refuses fails in a fraction of a second


def assert_no_gap(slots: list[str]) -> None:
    """An every-second job: one row for every second from the first slot to the last."""
    times = [from_iso(slot) for slot in slots]
    assert len(times) == len(set(times)) == int((times[-1] - times[0]).total_seconds()) + 1, slots


def test_an_outcome_the_store_refuses_is_kept_and_written_once_it_is_back(tmp_path):
    db, out, release = tmp_path / "state.db", tmp_path / "ran.txt", tmp_path / "release"
    clock = SteppingClock(START)
    # The first run waits for `release`, so the test can take the lock while it is still running.
    script = f'echo "$CLUSTERCTL_SCHEDULED_FOR" >> {shlex.quote(str(out))}; until [ -e {shlex.quote(str(release))} ];'
    job = JobConfig(
        name="tick", schedule=EVERY_SECOND, command=("sh", "-c", script + " do sleep 0.02; done"), catch_up="none"
    )
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)

    def row_of(slot: str) -> dict:
        return next(r for r in job_rows(db) if r["scheduled_for"] == slot)

    async def scenario() -> tuple[str, datetime, datetime, str | None]:
        store = Store(db, clock=clock.timestamp, busy_timeout_ms=BUSY_TIMEOUT_MS)
        async with scheduling(store, job, clock, events) as scheduler:
            state = scheduler.job("tick")
            first = await until(lambda: out.exists() and out.read_text().split(), 10, "the first run to start")
            blocker = sqlite3.connect(db, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                locked_at = clock()
                release.touch()
                # The run is over: the scheduler knows it, though the store has not taken the outcome.
                await until(lambda: state.last_status == "succeeded" and not state.running, 10, "the run to end")
                error = await until(lambda: scheduler.store.last_error, 10, "the store error to be reported")
                await until(lambda: any(e.kind == "job.store_error" for e in seen), 10, "a store_error event")
                assert row_of(first[0])["status"] == "running"
                # Several retries of the write fail, and several slots come due, while the lock is held.
                await until(lambda: clock() > locked_at + timedelta(seconds=5), 10, "the lock to be held a while")
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            unlocked_at = clock()
            await until(lambda: row_of(first[0])["status"] == "succeeded", 15, "the outcome to be written")

            def regular_run_after_the_lock() -> bool:
                return any(
                    from_iso(r["scheduled_for"]) > unlocked_at and r["status"] == "succeeded" for r in job_rows(db)
                )

            await until(regular_run_after_the_lock, 15, "a regular run after the lock")
            await until(lambda: scheduler.store.last_error is None, 15, "the store error to clear")
            return first[0], locked_at, unlocked_at, error

    first, locked_at, unlocked_at, error = asyncio.run(scenario())
    assert "locked" in error and str(db) in error, error
    rows = job_rows(db)
    assert_no_gap([r["scheduled_for"] for r in rows])
    ran = out.read_text().split()
    assert len(ran) == len(set(ran)), "a slot ran twice"
    assert ran[0] == first
    first_id = rows[0]["id"]
    for row in rows:
        if from_iso(row["scheduled_for"]) > locked_at + timedelta(seconds=1):
            # Once the run had ended, its row, stale only because of the store, holds up no later slot.
            assert f"run {first_id} of this job was still running" not in row["output"], row
        if locked_at < from_iso(row["scheduled_for"]) < unlocked_at - timedelta(seconds=3):
            assert row["status"] == "skipped" and "store" in row["output"], row
        if row["status"] == "succeeded":
            assert row["scheduled_for"] in ran, row


def test_a_stalled_loop_follows_catch_up(tmp_path):
    db, out = tmp_path / "state.db", tmp_path / "ran.txt"
    clock = SteppingClock(START)
    job = JobConfig(
        name="tick",
        schedule=EVERY_SECOND,
        command=("sh", "-c", f'echo "$CLUSTERCTL_SCHEDULED_FOR" >> {shlex.quote(str(out))}'),
        overlap="allow",
        catch_up="none",
    )

    async def scenario() -> tuple[datetime, datetime]:
        async with scheduling(Store(db, clock=clock.timestamp), job, clock):
            await until(lambda: [r for r in job_rows(db) if r["status"] == "succeeded"], 10, "a first run")
            stalled_at = clock()
            time.sleep(5)  # the fault itself: a primary whose event loop is blocked, not synchronisation
            resumed_at = clock()
            await until(
                lambda: any(from_iso(r["scheduled_for"]) > resumed_at + timedelta(seconds=1) for r in job_rows(db)),
                10,
                "a regular slot after the stall",
            )
            return stalled_at, resumed_at

    stalled_at, resumed_at = asyncio.run(scenario())
    rows = job_rows(db)
    assert_no_gap([r["scheduled_for"] for r in rows])
    ran = out.read_text().split()
    assert len(ran) == len(set(ran)), "a slot ran twice"
    missed = [r for r in rows if stalled_at < from_iso(r["scheduled_for"]) < resumed_at - timedelta(seconds=3)]
    assert len(missed) >= 1
    for row in missed:
        assert (row["trigger"], row["status"]) == ("catch_up", "skipped"), row
        assert "the primary was stalled" in row["output"] and "catch_up = none" in row["output"], row
        assert row["scheduled_for"] not in ran
    for row in rows:
        if from_iso(row["scheduled_for"]) > resumed_at:
            assert row["trigger"] == "schedule" and row["status"] != "skipped", row


def test_a_retry_waits_for_the_store_and_every_attempt_is_recorded(tmp_path):
    db, count, release = tmp_path / "state.db", tmp_path / "count", tmp_path / "release"
    clock = SteppingClock(START)
    # Attempt 1 waits for `release`, then fails; attempt 2 succeeds at once.
    script = (
        f"n=$(cat {shlex.quote(str(count))} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {shlex.quote(str(count))};"
        f" [ $n -ge 2 ] && exit 0; until [ -e {shlex.quote(str(release))} ]; do sleep 0.02; done; exit 1"
    )
    job = JobConfig(name="flaky", schedule="0 0 1 1 *", command=("sh", "-c", script), retries=1)

    async def scenario() -> int:
        store = Store(db, clock=clock.timestamp, busy_timeout_ms=BUSY_TIMEOUT_MS)
        async with scheduling(store, job, clock) as scheduler:
            run_id = await scheduler.run_now("flaky")
            await until(lambda: count.exists() and count.read_text().strip() == "1", 10, "attempt 1 to start")
            blocker = sqlite3.connect(db, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                locked_at = clock()
                release.touch()
                await until(lambda: scheduler.store.last_error, 10, "the refused attempt record to be reported")
                await until(lambda: clock() > locked_at + timedelta(seconds=2), 10, "the lock to be held a while")
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            await asyncio.wait_for(scheduler.wait_run("flaky", run_id), 20)
            return run_id

    run_id = asyncio.run(scenario())
    (row,) = job_rows(db)
    assert (row["id"], row["status"], row["attempt"], row["exit_code"]) == (run_id, "succeeded", 2, 0), row
    conn = sqlite3.connect(db)
    try:
        tries = conn.execute(
            "SELECT attempt, status, exit_code FROM job_attempts WHERE run_id = ? ORDER BY id", (run_id,)
        )
        assert tries.fetchall() == [(1, "failed", 1), (2, "succeeded", 0)]
    finally:
        conn.close()
