"""Catch-up and slot claiming with an injected clock and a real store (no waiting for real time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runtime.config import JobConfig
from runtime.cron import from_iso, to_iso
from runtime.events import EventBus
from runtime.scheduler import Scheduler
from runtime.store import AsyncStore, Store

NOW = datetime(2026, 11, 22, 12, 0, 30, tzinfo=UTC)
EVERY_10S = "*/10 * * * * *"
T = TypeVar("T")


class SteppingClock:
    """UTC wall time that starts at `start`, runs at the pace of the monotonic clock, and can be stepped like ntpd."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.offset = timedelta()
        self.began = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + self.offset + timedelta(seconds=time.monotonic() - self.began)

    def timestamp(self) -> float:
        return self().timestamp()

    def step(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


async def until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` on the running loop (the scheduler keeps running meanwhile) until it is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def scheduling(
    store: Store, job: JobConfig, clock: Callable[[], datetime], events: EventBus | None = None
) -> AsyncIterator[Scheduler]:
    async_store = AsyncStore(store)
    scheduler = Scheduler((job,), async_store, events or EventBus(), {}, os.getpid(), now=clock)
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop()
        async_store.close()


def job_rows(db: Path) -> list[dict[str, Any]]:
    """Every job_runs row, oldest slot first (a reader of its own: it never waits on the scheduler's writes)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM job_runs ORDER BY scheduled_for, id")]
    finally:
        conn.close()


def marking(path: Path) -> tuple[str, ...]:
    """A command that appends "start SLOT" and "end SLOT" to `path`, so a test can see runs overlap."""
    target = shlex.quote(str(path))
    slot = "$CLUSTERCTL_SCHEDULED_FOR"
    return ("sh", "-c", f'echo "start {slot}" >> {target}; echo "end {slot}" >> {target}')


def marks(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def peak_concurrency(lines: list[list[str]]) -> int:
    running = peak = 0
    for kind, _slot in lines:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


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
    store = Store(db, clock=NOW.timestamp)
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
    first, second = Store(db, clock=NOW.timestamp), Store(db, clock=NOW.timestamp)
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


@pytest.mark.parametrize(
    "catch_up, jump",
    # "all" runs every missed slot, one after another: a shorter jump keeps the test quick.
    [("none", 3600), ("latest", 3600), ("all", 600)],
)
def test_a_clock_step_forward_follows_catch_up(tmp_path, catch_up, jump):
    db, out = tmp_path / "state.db", tmp_path / "marks.txt"
    start = datetime(2026, 11, 22, 12, 0, 6, tzinfo=UTC)
    clock = SteppingClock(start)
    # overlap = "allow": nothing but the scheduler itself may keep the missed slots from running all at once.
    job = JobConfig(name="tick", schedule=EVERY_10S, command=marking(out), overlap="allow", catch_up=catch_up)
    jumped = start + timedelta(seconds=jump)
    missed = [to_iso(start + timedelta(seconds=s)) for s in range(4, jump, 10)]  # 12:00:10 up to the jump

    async def scenario() -> None:
        async with scheduling(Store(db, clock=clock.timestamp), job, clock) as scheduler:
            first = start.replace(second=10)
            await until(lambda: scheduler.job("tick").next_run == first, 5, "the loop to wait for its first slot")
            clock.step(jump)

            def scheduled_after_the_jump() -> bool:
                return any(
                    r["trigger"] == "schedule" and r["status"] == "succeeded" and r["scheduled_for"] > to_iso(jumped)
                    for r in job_rows(db)
                )

            await until(scheduled_after_the_jump, 30, "a regular run after the jump")

    asyncio.run(scenario())
    rows = job_rows(db)
    caught = [r for r in rows if r["scheduled_for"] <= missed[-1]]
    assert [r["scheduled_for"] for r in caught] == missed  # one row for every slot the jump skipped over
    assert all(r["trigger"] == "catch_up" for r in caught), {r["trigger"] for r in caught}
    ran = [r for r in caught if r["status"] != "skipped"]
    skipped = [r for r in caught if r["status"] == "skipped"]
    for row in skipped:
        assert f"the clock jumped forward {jump}s" in row["output"], row
        assert f"catch_up = {catch_up}" in row["output"], row
    if catch_up == "none":
        assert ran == []
    elif catch_up == "latest":
        assert [(r["scheduled_for"], r["status"]) for r in ran] == [(missed[-1], "succeeded")]
    else:
        assert skipped == [] and all(r["status"] == "succeeded" for r in ran)
    lines = marks(out)
    assert peak_concurrency(lines) == 1, "missed slots must never start all at once"
    started = [slot for kind, slot in lines if kind == "start"]
    assert len(started) == len(set(started)), "a slot ran twice"


def test_a_clock_step_back_keeps_the_rhythm(tmp_path):
    db, out = tmp_path / "state.db", tmp_path / "marks.txt"
    start = datetime(2026, 11, 22, 12, 0, 8, tzinfo=UTC)
    clock = SteppingClock(start)
    job = JobConfig(name="tick", schedule=EVERY_10S, command=marking(out))
    first = to_iso(start.replace(second=10))

    async def scenario() -> tuple[datetime, datetime, dict[str, Any]]:
        async with scheduling(Store(db, clock=clock.timestamp), job, clock):

            def succeeded(after: str, before: str) -> dict[str, Any] | None:
                rows = [r for r in job_rows(db) if after <= r["scheduled_for"] < before]
                return next((r for r in rows if r["status"] == "succeeded"), None)

            await until(lambda: succeeded(first, "9999"), 10, "the first regular run")
            clock.step(-3600)
            stepped = clock()
            row = await until(lambda: succeeded(to_iso(stepped), first), 30, "a run after the clock went back")
            return stepped, clock(), row

    stepped, seen, row = asyncio.run(scenario())
    period = timedelta(seconds=10)
    assert row["trigger"] == "schedule"
    assert from_iso(row["scheduled_for"]) <= stepped + 2 * period, (row, stepped)
    assert seen - stepped <= 3 * period  # by the stepped clock: the job kept its rhythm, it did not wait an hour
    assert marks(out).count(["start", first]) == 1
