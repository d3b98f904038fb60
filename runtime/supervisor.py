"""The supervisor: reconciles the actual workers to the desired count.

The shape is gunicorn's arbiter, on asyncio. Actions (scale, reload, kill,
stop) and signals only change the desired state and wake one loop; that loop
spawns missing workers, drains surplus ones, replaces recycled ones and
murders hung ones. Worker exits arrive from the process handles the moment
they happen (a pidfd registered with the loop), not at the next poll.

Each slot (1..N, `CLUSTERCTL_WORKER_ID`) holds at most one serving worker
(`current`) and one being started to take its place (`incoming`, during a
rolling restart or a recycle). A replaced worker is drained: it stops
accepting, answers the requests it has with `Connection: close`, and exits.

This module holds the rules only. Processes are made by an injected
`Spawner` (`runtime.workerproc.ProcessSpawner` for real ones) and read the
time from an injected clock, so the rules are tested with fake handles and a
fake clock (tests/test_supervisor_rules.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .channel import EXIT_BOOT_ERROR, Heartbeat, describe_exit
from .config import MAX_WORKERS, Settings
from .errors import BootError, ReloadFailed
from .events import EventBus
from .listeners import Listener
from .logs import WorkerLogs
from .metrics import WorkerStats, merge, percentile
from .restarts import RestartPolicy
from .snapshot import ReloadSnapshot, WorkerSnapshot
from .workerproc import ProcessSpawner, Reports, heartbeat_interval

TICK = 0.25  # seconds between checks for hung workers and expired back-offs
KILL_GRACE = 2.0  # after SIGABRT (or the drain deadline, or a drain that is done), SIGKILL
STALL = 1.0  # a tick this late means the primary itself was stalled (SIGSTOP, swap, a blocked loop)
SAMPLE_INTERVAL = 1.0  # seconds between CPU/RSS samples


class Handle(Protocol):
    """A worker process as the rules see it (`runtime.workerproc.WorkerProcess`, or a fake)."""

    @property
    def pid(self) -> int | None: ...  # None until the process exists

    @property
    def health_problem(self) -> str | None: ...

    def drain(self) -> None: ...

    def signal(self, sig: signal.Signals) -> None: ...


class Spawner(Protocol):
    def spawn(self, slot: int, generation: int, reports: Reports) -> Handle: ...

    async def prepare(self, generation: int) -> None: ...  # before a generation's first worker

    def keep(self, generation: int) -> None: ...  # only this generation is started from now on

    def configure(self, settings: Settings) -> None: ...

    def measure(self, pids: list[int]) -> dict[int, tuple[float, int]]: ...  # pid → (CPU %, RSS); blocking

    async def close(self) -> None: ...


@dataclass(eq=False)
class Worker:
    """The rules' record of one worker process."""

    slot: int
    generation: int
    spawned_at: float
    last_seen: float
    recycle_after: int
    ready: asyncio.Future[None]
    exited: asyncio.Future[int]
    process: Handle | None = None  # set as soon as the spawner returns
    state: str = "starting"
    ready_at: float | None = None
    heard: bool = False
    fatal: str | None = None
    kill_reason: str | None = None
    killed_at: float | None = None
    drain_reason: str | None = None
    recycling: bool = False
    drain_deadline: float | None = None
    drained_at: float | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    connections: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.signal(sig)


@dataclass(eq=False)
class Slot:
    id: int
    policy: RestartPolicy
    current: Worker | None = None
    incoming: Worker | None = None
    restarts: int = 0
    last_exit: str | None = None

    @property
    def backoff_until(self) -> float:
        return self.policy.backoff_until


@dataclass
class _Reload:
    generation: int
    total: int
    done: int = 0
    state: str = "running"
    error: str | None = None
    rolled: set[int] = field(default_factory=set)  # slots whose new worker serves already


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        events: EventBus,
        record: Callable[..., None],
        spawner: Spawner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.server = settings.server
        self.events = events
        self.record = record  # (worker_id, pid, event, exit_code, reason) → worker_events
        self.spawner = spawner
        self.clock = clock
        self.desired = settings.server.workers
        self.generation = 1
        self.slots: dict[int, Slot] = {}
        self.draining: set[Worker] = set()
        self.stopping = False
        self.reload_state: _Reload | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.heartbeat_interval = heartbeat_interval(self.server)
        self._last_check = clock()
        self._judge_after = 0.0

    @classmethod
    def for_processes(
        cls,
        settings: Settings,
        listener: Listener,
        events: EventBus,
        logs: WorkerLogs,
        record: Callable[..., None],
    ) -> Supervisor:
        """A supervisor of real worker processes serving `listener`."""
        return cls(settings, events, record, ProcessSpawner(settings, listener, events, logs))

    # ------------------------------------------------------------------ public actions

    async def start(self) -> None:
        """Spawn the first workers and wait until every one is ready; BootError if the app cannot start."""
        await self.spawner.prepare(self.generation)
        for slot_id in range(1, self.desired + 1):
            slot = self.slots[slot_id] = self._new_slot(slot_id)
            slot.current = self._spawn(slot_id, self.generation)
        try:
            await self._wait_ready([slot.current for slot in self.slots.values() if slot.current])
        except ReloadFailed as exc:
            await self._abort_all()
            raise BootError(str(exc)) from None
        self._spawn_task(self._loop())
        self._spawn_task(self._sample_resources())

    def set_desired(self, count: int) -> int:
        if count < 1:
            raise ValueError("the cluster needs at least 1 worker")
        if count > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} workers (asked for {count})")
        before, self.desired = self.desired, count
        if count != before:
            self.events.publish("cluster.scaled", f"scaled from {before} to {count} workers", old=before, new=count)
        self.wake()
        return count

    def kill(self, slot_id: int, reason: str = "killed by operator") -> int:
        slot = self.slots.get(slot_id)
        worker = slot.current if slot else None
        if worker is None or not worker.alive:
            raise LookupError(f"no running worker in slot {slot_id}")
        if worker.pid is None:
            raise LookupError(f"the worker in slot {slot_id} is still being started")
        self._kill(worker, reason, signal.SIGKILL)
        return worker.pid

    def configure(self, settings: Settings) -> None:
        """Settings re-read by a reload: the workers started from now on (the restart's) get them."""
        self.settings = settings
        self.server = settings.server
        self.heartbeat_interval = heartbeat_interval(self.server)
        self.spawner.configure(settings)

    @property
    def reloading(self) -> bool:
        return self._reload_task is not None and not self._reload_task.done()

    def reload(self) -> asyncio.Task[None]:
        """Start a rolling restart (or join the one running); the task raises ReloadFailed on rollback."""
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(self._rolling_restart())
        return self._reload_task

    async def stop(self) -> None:
        """Drain every worker and wait until all have exited (SIGKILL after graceful_timeout)."""
        self.stopping = True
        if self._reload_task and not self._reload_task.done():
            self._reload_task.cancel()
        for worker in self._all_workers():
            if worker.state != "draining":
                self._drain(worker, "stop")
        self.wake()
        pending = [w.exited for w in self._all_workers() if not w.exited.done()]
        if pending:
            await asyncio.wait(pending)
        for task in self._tasks:
            task.cancel()
        await self.spawner.close()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ snapshots

    def worker_snapshots(self, now: float) -> list[WorkerSnapshot]:
        rows: list[WorkerSnapshot] = []
        for slot_id in sorted(self.slots):
            slot = self.slots[slot_id]
            workers = [w for w in (slot.current, slot.incoming) if w is not None]
            workers += sorted((w for w in self.draining if w.slot == slot_id), key=lambda w: w.spawned_at)
            for worker in workers:
                rows.append(self._worker_row(slot, worker, now))
            if not workers and slot_id <= self.desired:
                rows.append(
                    WorkerSnapshot(
                        id=slot_id,
                        pid=None,
                        state="backoff",
                        generation=self.generation,
                        restarts=slot.restarts,
                        backoff_seconds=max(0.0, slot.backoff_until - now),
                        last_exit=slot.last_exit,
                    )
                )
        return rows

    def _worker_row(self, slot: Slot, worker: Worker, now: float) -> WorkerSnapshot:
        stats = worker.stats
        histogram = stats.window_histogram()
        return WorkerSnapshot(
            id=slot.id,
            pid=worker.pid,
            state=worker.state,
            generation=worker.generation,
            cpu_percent=worker.cpu_percent,
            rss_bytes=worker.rss_bytes,
            requests_total=stats.requests_total,
            requests_per_second=round(stats.rate(now), 2),
            p50_ms=round(percentile(histogram, 0.50), 3),
            p99_ms=round(percentile(histogram, 0.99), 3),
            restarts=slot.restarts,
            uptime_seconds=round(now - worker.spawned_at, 1),
            in_flight=stats.in_flight,
            connections=worker.connections,
            errors_5xx=stats.by_class[5],
            last_exit=slot.last_exit,
            rps_history=tuple(stats.rps_history),
        )

    def live_stats(self) -> list[WorkerStats]:
        return [w.stats for w in self._all_workers()]

    def window_histogram(self) -> list[int]:
        return merge([w.stats.window_histogram() for w in self._all_workers()])

    def reload_snapshot(self) -> ReloadSnapshot | None:
        r = self.reload_state
        return ReloadSnapshot(r.generation, r.total, r.done, r.state, r.error) if r else None

    def _all_workers(self) -> list[Worker]:
        workers = [w for slot in self.slots.values() for w in (slot.current, slot.incoming) if w is not None]
        return workers + list(self.draining)

    # ------------------------------------------------------------------ spawning and what workers report

    def _new_slot(self, slot_id: int) -> Slot:
        return Slot(slot_id, RestartPolicy(clock=self.clock))

    def _spawn(self, slot_id: int, generation: int) -> Worker:
        loop = asyncio.get_running_loop()
        now = self.clock()
        jitter = random.randint(0, self.server.max_requests_jitter) if self.server.max_requests else 0
        worker = Worker(
            slot=slot_id,
            generation=generation,
            spawned_at=now,
            last_seen=now,
            recycle_after=self.server.max_requests + jitter,
            ready=loop.create_future(),
            exited=loop.create_future(),
        )
        worker.ready.add_done_callback(_consume_exception)
        if slot_id in self.slots:
            self.slots[slot_id].policy.spawned()
        worker.process = self.spawner.spawn(slot_id, generation, _Reports(self, worker))
        return worker

    def _on_started(self, worker: Worker, pid: int) -> None:
        self.record(worker.slot, pid, "spawned", None, f"generation {worker.generation}")
        self.events.publish(
            "worker.spawned",
            f"spawned (generation {worker.generation})",
            worker.slot,
            pid,
            generation=worker.generation,
        )

    def _on_heard(self, worker: Worker, heartbeat: Heartbeat | None) -> None:
        now = self.clock()
        worker.last_seen = now
        worker.heard = True
        if heartbeat is not None:
            worker.stats.update(heartbeat.by_class, heartbeat.histogram, heartbeat.in_flight, now)
            worker.connections = heartbeat.connections

    def _on_ready(self, worker: Worker) -> None:
        if worker.state != "starting":
            return  # drained (scaled down, stopped) before it was ready: it stays draining
        worker.state = "ready"
        worker.ready_at = self.clock()
        self.record(worker.slot, worker.pid, "ready", None, None)
        self.events.publish("worker.ready", "ready", worker.slot, worker.pid)
        if not worker.ready.done():
            worker.ready.set_result(None)
        self.wake()

    def _on_drained(self, worker: Worker) -> None:
        # Its requests are answered; what is left is the interpreter's exit, which a non-daemon thread
        # of the app can hold up for ever. _check_liveness ends it KILL_GRACE from now.
        worker.drained_at = self.clock()

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while True:
            try:
                self._reconcile(self.clock())
            except Exception as exc:  # never let one bad tick stop supervision
                print(f"clusterctl: supervisor error: {exc!r}", file=sys.stderr)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()

    def _reconcile(self, now: float) -> None:
        self._check_liveness(now)
        if self.stopping:
            return
        rolling = self.reload_state if self.reload_state and self.reload_state.state == "running" else None
        for slot_id in range(1, self.desired + 1):
            slot = self.slots.get(slot_id)
            if slot is None:
                slot = self.slots[slot_id] = self._new_slot(slot_id)
            if slot.incoming is not None and slot.incoming.state == "ready":
                self._promote(slot)
            if slot.current is None and slot.incoming is None and now >= slot.backoff_until:
                # A slot the rolling restart has done already is refilled with the new code.
                rolled = rolling is not None and slot_id in rolling.rolled
                slot.current = self._spawn(slot_id, rolling.generation if rolled else self.generation)
        for slot_id in [s for s in self.slots if s > self.desired]:
            slot = self.slots[slot_id]
            for worker in (slot.current, slot.incoming):
                if worker is not None:
                    self._drain(worker, "scale")
            slot.current = slot.incoming = None
            del self.slots[slot_id]
        self._maybe_recycle(now)

    def _check_liveness(self, now: float) -> None:
        if now - self._last_check > STALL:
            # We were not running: the heartbeats workers sent meanwhile sit unread in their
            # channels. Judge no one until those have been read.
            self._judge_after = now + 2 * self.heartbeat_interval
        self._last_check = now
        hang_checks = now >= self._judge_after
        for worker in self._all_workers():
            if not worker.alive:
                continue
            if worker.killed_at is not None:
                if now - worker.killed_at > KILL_GRACE:
                    worker.signal(signal.SIGKILL)
                continue
            if worker.drained_at is not None:
                if now - worker.drained_at > KILL_GRACE:
                    worker.drain_reason = f"{worker.drain_reason}; still running {KILL_GRACE:g}s after its drain, ended"
                    worker.drained_at = None
                    worker.killed_at = now  # not a kill_reason: the exit is still recorded as a clean one
                    worker.signal(signal.SIGKILL)
                continue
            if worker.drain_deadline is not None:
                if now > worker.drain_deadline:
                    self._kill(worker, f"still draining after {self.server.graceful_timeout:g}s", signal.SIGKILL)
                continue
            if not hang_checks:
                continue
            limit = self.server.timeout if worker.heard else max(self.server.timeout, self.server.ready_timeout)
            if now - worker.last_seen > limit:
                # SIGABRT first: faulthandler writes every thread's stack to stderr, which we keep.
                self._kill(worker, f"no heartbeat for {limit:g}s", signal.SIGABRT)
            elif worker.state == "starting" and now - worker.spawned_at > self.server.ready_timeout:
                self._fail_start(worker, f"not ready within {self.server.ready_timeout:g}s")

    def _maybe_recycle(self, now: float) -> None:
        if self.reload_state and self.reload_state.state == "running":
            return
        if any(slot.incoming is not None for slot in self.slots.values()):
            return  # one at a time, never all at once
        limit_bytes = self.server.max_memory_mb * 1024 * 1024
        for slot in self.slots.values():
            worker = slot.current
            if worker is None or worker.state != "ready" or now < slot.backoff_until:
                continue
            reason = None
            if self.server.max_requests and worker.stats.requests_total >= worker.recycle_after:
                reason = f"served {worker.stats.requests_total} requests (max_requests {worker.recycle_after})"
            elif limit_bytes and worker.rss_bytes > limit_bytes:
                reason = f"RSS {worker.rss_bytes // (1024 * 1024)} MiB over max_memory_mb {self.server.max_memory_mb}"
            if reason:
                worker.drain_reason = reason
                worker.recycling = True
                slot.incoming = self._spawn(slot.id, worker.generation)
                return

    def _promote(self, slot: Slot) -> None:
        old, slot.current, slot.incoming = slot.current, slot.incoming, None
        if old is not None and old.alive:
            self._drain(old, old.drain_reason or "replaced")

    def _drain(self, worker: Worker, reason: str) -> None:
        worker.state = "draining"
        worker.drain_reason = worker.drain_reason or reason
        worker.drain_deadline = self.clock() + self.server.graceful_timeout + KILL_GRACE
        for slot in self.slots.values():
            if slot.current is worker:
                slot.current = None
            if slot.incoming is worker:
                slot.incoming = None
        self.draining.add(worker)
        assert worker.process is not None
        worker.process.drain()

    def _kill(self, worker: Worker, reason: str, sig: signal.Signals) -> None:
        if worker.kill_reason is None:
            worker.kill_reason = reason
            worker.killed_at = self.clock()
        worker.signal(sig)

    def _fail_start(self, worker: Worker, reason: str) -> None:
        worker.fatal = worker.fatal or reason
        if not worker.ready.done():
            worker.ready.set_exception(ReloadFailed(f"worker {worker.slot} (pid {worker.pid}): {reason}"))
        self._kill(worker, reason, signal.SIGKILL)

    def _on_exit(self, worker: Worker, code: int) -> None:
        worker.exited.set_result(code)
        slot = self.slots.get(worker.slot)
        self.draining.discard(worker)
        if slot is not None:
            if slot.current is worker:
                slot.current = None
            if slot.incoming is worker:
                slot.incoming = None
        how = describe_exit(code)
        if not worker.ready.done():
            reason = worker.fatal or f"exited before ready ({how})"
            worker.ready.set_exception(ReloadFailed(f"worker {worker.slot} (pid {worker.pid}): {reason}"))
        if worker.drain_reason and worker.kill_reason is None:
            event = "recycled" if worker.recycling else "exited"
            self.record(worker.slot, worker.pid, event, code, worker.drain_reason)
            kind = "worker.recycled" if worker.recycling else "worker.exited"
            self.events.publish(kind, f"{event} ({worker.drain_reason})", worker.slot, worker.pid, exit_code=code)
        else:
            killed = worker.kill_reason is not None
            reason = worker.kill_reason or worker.fatal or how
            self.record(worker.slot, worker.pid, "killed" if killed else "crashed", code, reason)
            self.events.publish(
                "worker.crashed",
                f"{'killed' if killed else 'crashed'}: {reason}",
                worker.slot,
                worker.pid,
                exit_code=code,
                reason=reason,
            )
            if slot is not None and not self.stopping:
                slot.restarts += 1
                slot.last_exit = reason
                slot.policy.died(
                    code,
                    killed_by_us=worker.kill_reason not in (None, "killed by operator"),
                    ready_at=worker.ready_at,
                    boot_error=code == EXIT_BOOT_ERROR,
                )
        self.wake()

    async def _abort_all(self) -> None:
        workers = self._all_workers()
        for worker in workers:
            worker.signal(signal.SIGKILL)
        pending = [w.exited for w in workers if not w.exited.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)

    # ------------------------------------------------------------------ rolling restart

    async def _rolling_restart(self) -> None:
        generation = self.generation + 1
        slot_ids = sorted(s for s in self.slots if s <= self.desired)
        state = self.reload_state = _Reload(generation, len(slot_ids))
        self.events.publish("cluster.reload_started", f"rolling restart to generation {generation}")
        replaced: list[Worker] = []
        batch = self.server.reload_batch
        try:
            # The new generation's fork server first: it imports the new code (and, with preload_app, the app).
            await self.spawner.prepare(generation)
            for start in range(0, len(slot_ids), batch):
                incoming: list[Worker] = []
                for slot_id in slot_ids[start : start + batch]:
                    slot = self.slots.get(slot_id)
                    if slot is None:
                        continue
                    if slot.incoming is not None:  # a recycle in flight: let it finish first
                        with contextlib.suppress(ReloadFailed):
                            await slot.incoming.ready
                    slot.incoming = self._spawn(slot_id, generation)
                    incoming.append(slot.incoming)
                try:
                    await self._wait_ready(incoming)
                except ReloadFailed as exc:
                    reason = str(exc)
                    for worker in incoming:
                        if worker.alive and worker.state != "ready":
                            self._fail_start(worker, reason)
                        slot = self.slots.get(worker.slot)
                        if slot is not None and slot.incoming is worker:
                            slot.incoming = None
                    raise ReloadFailed(reason) from None
                for worker in incoming:
                    slot = self.slots.get(worker.slot)
                    if slot is not None and slot.incoming is worker:
                        if slot.current is not None:
                            replaced.append(slot.current)
                            slot.current.drain_reason = "reload"
                        self._promote(slot)
                    state.rolled.add(worker.slot)
                    state.done += 1
            self.generation = generation
            self.spawner.keep(generation)
            pending = [w.exited for w in replaced if not w.exited.done()]
            if pending:
                await asyncio.wait(pending, timeout=self.server.graceful_timeout + 2 * KILL_GRACE)
        except ReloadFailed as exc:
            self.spawner.keep(self.generation)
            state.state, state.error = "failed", str(exc)
            self.events.publish(
                "cluster.reload_failed",
                f"rolling restart rolled back after {state.done}/{state.total} slots: {exc}",
                replaced=state.done,
                error=str(exc),
            )
            raise
        state.state = "succeeded"
        self.events.publish("cluster.reloaded", f"rolling restart done: generation {generation}", generation=generation)

    async def _wait_ready(self, workers: list[Worker]) -> None:
        """Until every one is ready; ReloadFailed naming the first that died, failed its check or was too slow."""
        try:
            async with asyncio.timeout(self.server.ready_timeout):
                for worker in workers:
                    await worker.ready
        except TimeoutError:
            reason = f"not ready within {self.server.ready_timeout:g}s"
            problems = [
                f"worker {w.slot} (pid {w.pid}): {w.process.health_problem}"
                for w in workers
                if w.process is not None and w.process.health_problem
            ]
            raise ReloadFailed(f"{reason} ({problems[0]})" if problems else reason) from None

    # ------------------------------------------------------------------ resources

    async def _sample_resources(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            workers = [w for w in self._all_workers() if w.alive and w.pid is not None]
            samples = await asyncio.to_thread(self.spawner.measure, [w.pid for w in workers if w.pid is not None])
            now = self.clock()
            for worker in workers:
                assert worker.pid is not None
                worker.cpu_percent, worker.rss_bytes = samples.get(worker.pid, (0.0, 0))
                worker.stats.tick_history(now)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Reports:
    """One worker's reports (see `runtime.workerproc.Reports`), handed to the rules with its record."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def started(self, pid: int) -> None:
        self._supervisor._on_started(self._worker, pid)

    def heard(self, heartbeat: Heartbeat | None) -> None:
        self._supervisor._on_heard(self._worker, heartbeat)

    def fatal(self, error: str) -> None:
        self._worker.fatal = error

    def ready(self) -> None:
        self._supervisor._on_ready(self._worker)

    def unhealthy(self, reason: str) -> None:
        if self._worker.alive:
            self._supervisor._fail_start(self._worker, reason)

    def drained(self) -> None:
        self._supervisor._on_drained(self._worker)

    def exited(self, code: int) -> None:
        self._supervisor._on_exit(self._worker, code)


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
