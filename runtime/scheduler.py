"""The scheduler: cron jobs on the primary only, each slot run exactly once.

Every slot is claimed with an insert into `job_runs` under
UNIQUE(job, scheduled_for) (see `Store.claim_slot`): of several primaries
sharing one store, exactly one wins each slot and the others move on. Slots
missed while no primary ran are handled at start by the job's `catch_up`
policy and recorded either way, and so are slots a running primary reached
late (the clock jumped forward, the event loop stalled, the store held it
up); runs left `running` by a dead primary are marked `abandoned`.

The scheduler acts on a run's outcome as soon as it is known, and writes it
to the store until the store takes it: a store that refuses writes for a
while delays the row, never loses it, and does not hold up later slots.

The clock is injectable (`now`), so slot computation and catch-up are tested
without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx

from .config import JobConfig
from .cron import CronSchedule, from_iso, to_iso
from .events import EventBus
from .jobrunner import Outcome, run_attempt
from .processes import pid_alive
from .snapshot import JobSnapshot
from .store import BUSY_TIMEOUT_MS, STORE_ERRORS, AsyncStore

T = TypeVar("T")
MAX_CATCH_UP = 1000  # slots handled one by one at start; beyond that, one summary event
MAX_SLEEP = 1.0  # re-read the clock at least this often, so a clock step is noticed
# `_sleep_until` reaches a slot within about MAX_SLEEP of its time; a slot reached later than this was
# missed (the clock jumped, the loop stalled, the store held it up) and follows the job's catch_up.
LATE = timedelta(seconds=2 * MAX_SLEEP)
RETRY_BASE = 1.0
RETRY_CAP = 300.0
# Between tries of a write the store refused; each try itself waits at most the store's busy timeout.
STORE_RETRY_BASE = 0.2
STORE_RETRY_CAP = 5.0
# At stop, outcomes the store has not taken yet get one more try after the longest back-off.
STOP_GRACE = STORE_RETRY_CAP + BUSY_TIMEOUT_MS / 1000 + 1.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobState:
    config: JobConfig
    schedule: CronSchedule
    next_run: datetime | None = None
    paused: bool = False
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    # Runs that have ended, each with the task writing its outcome, until the store has taken it.
    recording: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    last_status: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    retired: bool = False  # a reload removed or changed this job: its loop ends at its next turn


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
        self._store_failures = 0  # counts every refused write, so a loop can tell the store held it up

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

    async def update(self, jobs: tuple[JobConfig, ...]) -> list[str]:
        """Take the jobs of a reloaded config; returns what changed, in words.

        A removed or changed job stops being scheduled at its loop's next turn (a run in progress
        finishes, and is still ended by `stop`); a changed job's new schedule starts at once, keeping
        its runs, pause and last status. Slots are claimed as ever, so none runs twice meanwhile.
        """
        wanted = {job.name: job for job in jobs}
        changes = []
        if wanted and self._http is None:
            self._http = httpx.AsyncClient()
        for name, state in list(self.jobs.items()):
            if wanted.get(name) != state.config:
                state.retired = True
                state.wake.set()
                del self.jobs[name]
                changes.append(f"job {name} {'changed' if name in wanted else 'removed'}")
                if name in wanted:
                    job = wanted[name]
                    self.jobs[name] = JobState(
                        job,
                        CronSchedule(job.schedule, job.timezone),
                        paused=state.paused,
                        running=state.running,
                        recording=state.recording,
                        last_status=state.last_status,
                    )
                    self._spawn(self._job_loop(self.jobs[name]))
        for name, job in wanted.items():
            if name not in self.jobs:
                state = self.jobs[name] = JobState(job, CronSchedule(job.schedule, job.timezone))
                state.paused = name in await self.store.call(self.store.store.paused_jobs)
                self._spawn(self._job_loop(state))
                changes.append(f"job {name} added")
        return changes

    async def stop(self) -> None:
        """Stop scheduling; running jobs are ended (their process groups killed) and marked as such."""
        for task in list(self._tasks):
            task.cancel()
        running = [task for state in self.jobs.values() for task in state.running.values()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        # Outcomes still waiting for the store get a last chance; a row left `running` because the store
        # never took its outcome is marked abandoned by the next start.
        recording = [task for state in self.jobs.values() for task in state.recording.values()]
        if recording:
            _, late = await asyncio.wait(recording, timeout=STOP_GRACE)
            for task in late:
                task.cancel()
            await asyncio.gather(*recording, return_exceptions=True)
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
        """Until the run has ended and the store holds its outcome (a caller may read it from there)."""
        state = self.job(name)
        for tasks in (state.running, state.recording):  # a run's recording task exists before the run ends
            task = tasks.get(run_id)
            if task is not None:
                await asyncio.wait({task})

    async def set_paused(self, name: str, paused: bool) -> None:
        state = self.job(name)
        await self.store.call(self.store.store.set_paused, name, paused)
        state.paused = paused
        state.wake.set()
        self.events.publish(f"job.{'paused' if paused else 'resumed'}", f"{name} {'paused' if paused else 'resumed'}")

    def snapshot(self) -> list[JobSnapshot]:
        return [
            JobSnapshot(
                name=name,
                schedule=state.config.schedule,
                timezone=state.config.timezone,
                next_run=to_iso(state.next_run) if state.next_run and not state.paused else None,
                last_status=state.last_status,
                paused=state.paused,
                running=len(state.running),
            )
            for name, state in self.jobs.items()
        ]

    # ------------------------------------------------------------------ the schedule

    async def _job_loop(self, state: JobState) -> None:
        job = state.config
        db = self.store.store
        loop = asyncio.get_running_loop()
        now = self.now()
        last = await self._insist(f"{job.name}: reading its last slot", db.last_slot, job.name)
        cursor = now  # every slot up to here has been handled, or is in `missed`
        missed: tuple[datetime, datetime, str] | None = None  # slots to catch up: after, up to, why missed
        if last is None:
            await self._insist(f"{job.name}: recording its first slot", db.mark_slot, job.name, to_iso(now))
        else:
            missed = (from_iso(last), now, "missed while no primary was running")
        held_up: str | None = None  # what kept the last step from ending within LATE, if anything
        wall_mark, mono_mark = now, loop.time()  # both clocks as that step began: a jump moves only the wall
        backoff = STORE_RETRY_BASE
        error: str | None = None
        while not state.retired:
            subject = f"{job.name} missed slots"
            if missed is None:
                now = self.now()
                if now < cursor - LATE:
                    # The clock was set back: resume from the new now rather than wait for the old one. Slots
                    # that come round again and were claimed before are lost by the claim, never run twice.
                    gone = (cursor - now).total_seconds()
                    self.events.publish("job.clock", f"{job.name}: the clock went back {gone:.0f}s; resuming now")
                    cursor = now
                try:
                    slot = state.schedule.next_after(cursor)
                except Exception as exc:  # raised out of this task, it would end it without a word
                    state.next_run = None
                    self.events.publish(
                        "job.stopped", f"{job.name}: schedule {job.schedule!r} has no next slot ({exc}); not scheduled"
                    )
                    return
                state.next_run = slot
                if not await self._sleep_until(state, slot, cursor):
                    continue  # woken early (pause/resume, the clock went back): recompute
                now, subject = self.now(), f"{job.name} {to_iso(slot)}"
                if now - slot > LATE:
                    jump = (now - wall_mark).total_seconds() - (loop.time() - mono_mark)
                    if jump > LATE.total_seconds():
                        why = f"missed: the clock jumped forward {jump:.0f}s"
                    else:
                        why = f"missed: {held_up or 'the primary was stalled'}"
                    # Slots due within LATE of now are not missed: the next turns run them as scheduled.
                    missed = (cursor, now - LATE, why)
            wall_mark, mono_mark = self.now(), loop.time()
            failures, catching_up = self._store_failures, missed is not None
            try:
                if missed is not None:
                    await self._catch_up(state, *missed)
                    cursor, missed = missed[1], None
                elif state.paused:
                    await self.store.call(db.mark_slot, job.name, to_iso(slot))
                    cursor = slot
                else:
                    await self._fire(state, slot, "schedule")
                    cursor = slot
                if error is not None:
                    self._store_recovered(error)
                    error = None
                backoff = STORE_RETRY_BASE
            except STORE_ERRORS as exc:
                # No claim, no run: exactly-once needs the store. The cursor stays before the slot: it is
                # claimed on a later turn if the store is back within LATE, and follows catch_up if not.
                what = f"{subject}: not claimed, retrying"
                error = self._store_failed(what, exc, "job.not_run", publish=error is None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, STORE_RETRY_CAP)
            if self._store_failures > failures:
                held_up = "the store was unavailable"
            elif loop.time() - mono_mark <= LATE.total_seconds():
                held_up = None
            else:
                held_up = "earlier missed slots were being caught up" if catching_up else "the store was slow"

    async def _sleep_until(self, state: JobState, slot: datetime, since: datetime) -> bool:
        """Sleep until `slot`; False if woken early by a change to the job or by the clock going back before `since`."""
        state.wake.clear()
        while (delay := (slot - (now := self.now())).total_seconds()) > 0:
            if now < since - LATE:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, MAX_SLEEP)):
                    await state.wake.wait()
                    return False
        return True

    async def _catch_up(self, state: JobState, last: datetime, until: datetime, why: str) -> None:
        """The missed slots in (last, until], by the job's catch_up policy; `why` goes in the rows of those not run."""
        job = state.config
        missed = list(state.schedule.between(last, until, limit=MAX_CATCH_UP + 1))
        if not missed:
            return
        if len(missed) > MAX_CATCH_UP:
            self.events.publish(
                "job.catch_up", f"{job.name}: more than {MAX_CATCH_UP} slots missed; only the first ones are recorded"
            )
            missed = missed[:MAX_CATCH_UP]
        db = self.store.store
        to_run: list[datetime] = []
        if state.paused or job.catch_up == "none":
            policy = "paused" if state.paused else "catch_up = none"
        elif job.catch_up == "latest":
            to_run = missed[-1:]
            policy = "catch_up = latest runs only the latest"
        else:
            to_run = missed
            policy = ""
        for slot in missed:
            if slot not in to_run:
                await self._insist(
                    f"{job.name} {to_iso(slot)}: recording it as missed",
                    db.record_skipped,
                    job.name,
                    to_iso(slot),
                    "catch_up",
                    f"{why} ({policy})",
                    self.pid,
                )
        if to_run:
            self.events.publish("job.catch_up", f"{job.name}: catching up {len(to_run)} missed slot(s) ({why})")
        # One after another, whatever the overlap policy: after a long stop or a big clock jump, "all" with
        # overlap = "allow" would otherwise start hundreds of runs at once.
        for slot in to_run:
            task = await self._fire(state, slot, "catch_up")
            if task is not None:
                await asyncio.wait({task})

    async def _fire(self, state: JobState, slot: datetime, trigger: str) -> asyncio.Task[None] | None:
        job = state.config
        scheduled_for = to_iso(slot)
        outcome, run_id, running = await self.store.call(
            self.store.store.claim_slot,
            job.name,
            scheduled_for,
            trigger,
            self.pid,
            job.overlap,
            tuple(state.recording),
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
        label = f"{job.name} {scheduled_for}"
        env = {
            **os.environ,
            **self.env,
            "CLUSTERCTL_JOB": job.name,
            "CLUSTERCTL_SCHEDULED_FOR": scheduled_for,
            "CLUSTERCTL_RUN_ID": str(run_id),
            "CLUSTERCTL_TRIGGER": trigger,
        }
        outcome = Outcome("failed", None, "")
        attempt, started = 1, to_iso(self.now())
        ended: asyncio.CancelledError | None = None
        why = ""
        try:
            if job.jitter and trigger != "manual":
                await asyncio.sleep(random.uniform(0, job.jitter))
            for attempt in range(1, job.retries + 2):
                if attempt > 1:
                    await asyncio.sleep(min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 2)) * random.uniform(0.8, 1.2))
                    await self._insist(f"{label}: starting attempt {attempt}", db.begin_attempt, run_id, attempt)
                env["CLUSTERCTL_ATTEMPT"] = str(attempt)
                started = to_iso(self.now())
                try:
                    outcome = await run_attempt(job, env, self._http)
                except OSError as exc:
                    outcome = Outcome("failed", None, f"cannot start: {exc.strerror or exc}")
                if outcome.status == "succeeded" or attempt == job.retries + 1:
                    break
                await self._record(label, run_id, attempt, started, outcome, final=False)
        except asyncio.CancelledError as exc:
            ended, why = exc, str(exc.args[0]) if exc.args else "the primary stopped"
            outcome = Outcome("failed", None, f"[ended: {why}]")
        # The run is over whatever the store says: status and overlap act on that now, while the outcome
        # is written in the background until the store takes it.
        state.last_status = outcome.status
        record = asyncio.get_running_loop().create_task(
            self._record(label, run_id, attempt, started, outcome, final=True)
        )
        state.recording[run_id] = record
        record.add_done_callback(lambda _: state.recording.pop(run_id, None))
        if ended is not None:
            self.events.publish("job.failed", f"{label}: ended ({why})", job=job.name)
            raise ended
        ok = outcome.status == "succeeded"
        self.events.publish(
            "job.succeeded" if ok else "job.failed",
            f"{label} ({trigger}): {outcome.status}"
            + ("" if outcome.exit_code is None else f", exit code {outcome.exit_code}"),
            job=job.name,
            run_id=run_id,
            scheduled_for=scheduled_for,
            trigger=trigger,
            status=outcome.status,
            exit_code=outcome.exit_code,
        )

    async def _insist(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Call `fn` on the store until it succeeds: what it writes must not be lost to a store that refuses
        writes for a while (locked, full, read-only, unreachable). Each try waits at most the busy timeout."""
        delay = STORE_RETRY_BASE
        error: str | None = None
        while True:
            try:
                result = await self.store.call(fn, *args)
            except STORE_ERRORS as exc:
                retrying = f"{what}: retrying until the store takes it"
                error = self._store_failed(retrying, exc, "job.store_error", publish=error is None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_CAP)
                continue
            if error is not None:
                self._store_recovered(error)
                self.events.publish("job.store_recovered", f"{what}: done")
            return result

    def _store_failed(self, what: str, exc: BaseException, kind: str, publish: bool) -> str:
        """Show a refused write in `status` (store_error) and, once per streak (`publish`), as an event."""
        self._store_failures += 1
        error = f"store {self.store.store.label}: {exc}"
        self.store.last_error = error
        if publish:
            self.events.publish(kind, f"{what} ({exc})")
        return error

    def _store_recovered(self, error: str) -> None:
        if self.store.last_error == error:  # not if something else has failed since
            self.store.last_error = None

    async def _record(self, label: str, run_id: int, attempt: int, started: str, outcome: Outcome, final: bool) -> Any:
        """Write one attempt's outcome (the run's, if `final`) until the store takes it."""
        what = (
            f"{label}: recording its outcome ({outcome.status})" if final else f"{label}: recording attempt {attempt}"
        )
        return await self._insist(
            what,
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
