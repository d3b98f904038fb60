"""The scheduler: cron jobs on the primary only, each slot run exactly once.

Every slot is claimed with an insert into `job_runs` under
UNIQUE(job, scheduled_for) (see `Store.claim_slot`): of several primaries
sharing one store, exactly one wins each slot and the others move on. Slots
missed while no primary ran are handled at start by the job's `catch_up`
policy and recorded either way; runs left `running` by a dead primary are
marked `abandoned`.

The clock is injectable (`now`), so slot computation and catch-up are tested
without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from .config import JobConfig
from .cron import CronSchedule, from_iso, to_iso
from .events import EventBus
from .jobrunner import Outcome, run_attempt
from .processes import pid_alive
from .store import AsyncStore

MAX_CATCH_UP = 1000  # slots handled one by one at start; beyond that, one summary event
MAX_SLEEP = 1.0  # re-read the clock at least this often, so a clock step is noticed
RETRY_BASE = 1.0
RETRY_CAP = 300.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobState:
    config: JobConfig
    schedule: CronSchedule
    next_run: datetime | None = None
    paused: bool = False
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    last_status: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    def __init__(
        self,
        jobs: tuple[JobConfig, ...],
        store: AsyncStore,
        events: EventBus,
        env: dict[str, str],
        pid: int,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.jobs = {job.name: JobState(job, CronSchedule(job.schedule, job.timezone)) for job in jobs}
        self.store = store
        self.events = events
        self.env = env
        self.pid = pid
        self.now = now
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.jobs:
            return
        db = self.store.store
        abandoned = await self.store.call(
            db.abandon_runs, lambda pid: pid != self.pid and pid_alive(pid), "\n[abandoned: its primary died]"
        )
        for run_id in abandoned:
            self.events.publish("job.abandoned", f"run {run_id} was left running by a primary that died")
        paused = await self.store.call(db.paused_jobs)
        statuses = await self.store.call(db.last_statuses)
        self._http = httpx.AsyncClient()
        for name, state in self.jobs.items():
            state.paused = name in paused
            state.last_status = statuses.get(name)
            self._spawn(self._job_loop(state))

    async def stop(self) -> None:
        """Stop scheduling; running jobs are ended (their process groups killed) and marked as such."""
        running = [task for state in self.jobs.values() for task in state.running.values()]
        for task in list(self._tasks):
            if task not in running:
                task.cancel()
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    # ------------------------------------------------------------------ actions

    def job(self, name: str) -> JobState:
        try:
            return self.jobs[name]
        except KeyError:
            raise LookupError(f"no job named {name!r} (jobs: {', '.join(self.jobs) or 'none'})") from None

    async def run_now(self, name: str) -> int:
        """Start a manual run at once; returns its run id."""
        state = self.job(name)
        slot = self.now().isoformat(timespec="microseconds").replace("+00:00", "Z")
        outcome, run_id, _ = await self.store.call(self.store.store.claim_slot, name, slot, "manual", self.pid)
        assert outcome == "claimed" and run_id is not None
        self._start_run(state, run_id, slot, "manual")
        return run_id

    async def wait_run(self, name: str, run_id: int) -> None:
        task = self.job(name).running.get(run_id)
        if task is not None:
            await asyncio.shield(task)

    async def set_paused(self, name: str, paused: bool) -> None:
        state = self.job(name)
        await self.store.call(self.store.store.set_paused, name, paused)
        state.paused = paused
        state.wake.set()
        self.events.publish(f"job.{'paused' if paused else 'resumed'}", f"{name} {'paused' if paused else 'resumed'}")

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "schedule": state.config.schedule,
                "timezone": state.config.timezone,
                "next_run": to_iso(state.next_run) if state.next_run and not state.paused else None,
                "last_status": state.last_status,
                "paused": state.paused,
                "running": len(state.running),
            }
            for name, state in self.jobs.items()
        ]

    # ------------------------------------------------------------------ the schedule

    async def _job_loop(self, state: JobState) -> None:
        job = state.config
        db = self.store.store
        now = self.now()
        last = await self.store.call(db.last_slot, job.name)
        if last is None:
            await self.store.call(db.mark_slot, job.name, to_iso(now))
            cursor = now
        else:
            cursor = await self._catch_up(state, from_iso(last), now)
        while True:
            slot = state.schedule.next_after(cursor)
            state.next_run = slot
            if not await self._sleep_until(state, slot):
                continue  # woken early (pause/resume): recompute from the same cursor
            cursor = slot
            try:
                if state.paused:
                    await self.store.call(db.mark_slot, job.name, to_iso(slot))
                    continue
                await self._fire(state, slot, "schedule")
            except (OSError, sqlite3.Error) as exc:
                # No claim, no run: exactly-once needs the store. Say so and keep the schedule going.
                self.store.last_error = f"store {self.store.store.path}: {exc}"
                self.events.publish("job.not_run", f"{job.name} {to_iso(slot)}: not run, the store failed: {exc}")

    async def _sleep_until(self, state: JobState, slot: datetime) -> bool:
        """Sleep until `slot`; False if woken early by a change to the job."""
        state.wake.clear()
        while (delay := (slot - self.now()).total_seconds()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, MAX_SLEEP)):
                    await state.wake.wait()
                    return False
        return True

    async def _catch_up(self, state: JobState, last: datetime, now: datetime) -> datetime:
        job = state.config
        missed = list(state.schedule.between(last, now, limit=MAX_CATCH_UP + 1))
        if not missed:
            return now
        if len(missed) > MAX_CATCH_UP:
            self.events.publish(
                "job.catch_up", f"{job.name}: more than {MAX_CATCH_UP} slots missed; only the first ones are recorded"
            )
            missed = missed[:MAX_CATCH_UP]
        db = self.store.store
        to_run: list[datetime] = []
        if state.paused or job.catch_up == "none":
            why = "paused" if state.paused else "catch_up = none"
            reason = f"missed while no primary was running ({why})"
        elif job.catch_up == "latest":
            to_run = missed[-1:]
            reason = "missed while no primary was running (catch_up = latest runs only the latest)"
        else:
            to_run = missed
            reason = ""
        for slot in missed:
            if slot not in to_run:
                await self.store.call(db.record_skipped, job.name, to_iso(slot), "catch_up", reason, self.pid)
        if to_run:
            self.events.publish("job.catch_up", f"{job.name}: catching up {len(to_run)} missed slot(s)")
        for slot in to_run:
            task = await self._fire(state, slot, "catch_up")
            if task is not None and job.overlap != "allow":
                await asyncio.gather(task, return_exceptions=True)
        return now

    async def _fire(self, state: JobState, slot: datetime, trigger: str) -> asyncio.Task[None] | None:
        job = state.config
        scheduled_for = to_iso(slot)
        outcome, run_id, running = await self.store.call(
            self.store.store.claim_slot, job.name, scheduled_for, trigger, self.pid, job.overlap
        )
        if outcome == "lost":
            return None  # another primary on this store runs it
        assert run_id is not None
        if outcome == "skipped":
            state.last_status = "skipped"
            self.events.publish("job.skipped", f"{job.name} {scheduled_for}: previous run still running")
            return None
        if job.overlap == "replace":
            for other in running:
                task = state.running.get(other)
                if task is not None:
                    task.cancel(f"replaced by the run for {scheduled_for}")
        return self._start_run(state, run_id, scheduled_for, trigger)

    def _start_run(self, state: JobState, run_id: int, scheduled_for: str, trigger: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run(state, run_id, scheduled_for, trigger))
        state.running[run_id] = task
        task.add_done_callback(lambda _: state.running.pop(run_id, None))
        return task

    async def _run(self, state: JobState, run_id: int, scheduled_for: str, trigger: str) -> None:
        job = state.config
        db = self.store.store
        env = {
            **os.environ,
            **self.env,
            "CLUSTERCTL_JOB": job.name,
            "CLUSTERCTL_SCHEDULED_FOR": scheduled_for,
            "CLUSTERCTL_RUN_ID": str(run_id),
            "CLUSTERCTL_TRIGGER": trigger,
        }
        if job.jitter and trigger != "manual":
            await asyncio.sleep(random.uniform(0, job.jitter))
        outcome = Outcome("failed", None, "")
        for attempt in range(1, job.retries + 2):
            final = attempt == job.retries + 1
            if attempt > 1:
                await asyncio.sleep(min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 2)) * random.uniform(0.8, 1.2))
                await self.store.call(db.begin_attempt, run_id, attempt)
            env["CLUSTERCTL_ATTEMPT"] = str(attempt)
            started = to_iso(self.now())
            try:
                outcome = await run_attempt(job, env, self._http)
            except asyncio.CancelledError as exc:
                why = str(exc.args[0]) if exc.args else "the primary stopped"
                await self._settle(run_id, attempt, started, Outcome("failed", None, f"[ended: {why}]"), True)
                state.last_status = "failed"
                self.events.publish("job.failed", f"{job.name} {scheduled_for}: ended ({why})", job=job.name)
                raise
            except OSError as exc:
                outcome = Outcome("failed", None, f"cannot start: {exc.strerror or exc}")
            final = final or outcome.status == "succeeded"
            await self._settle(run_id, attempt, started, outcome, final)
            if final:
                break
        state.last_status = outcome.status
        ok = outcome.status == "succeeded"
        self.events.publish(
            "job.succeeded" if ok else "job.failed",
            f"{job.name} {scheduled_for} ({trigger}): {outcome.status}"
            + ("" if outcome.exit_code is None else f", exit code {outcome.exit_code}"),
            job=job.name,
            run_id=run_id,
            scheduled_for=scheduled_for,
            trigger=trigger,
            status=outcome.status,
            exit_code=outcome.exit_code,
        )

    async def _settle(self, run_id: int, attempt: int, started: str, outcome: Outcome, final: bool) -> None:
        await self.store.call(
            self.store.store.finish_attempt,
            run_id,
            attempt,
            started,
            outcome.status,
            outcome.exit_code,
            outcome.output,
            final,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
