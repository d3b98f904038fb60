"""The supervisor's rules with fake worker handles and a fake clock: no processes, no waiting for real time.

Each test drives the handles' reports (started, heard, ready, drained, exited) by hand and checks
what the rules asked of them (spawns, drains, signals) and what they recorded. The real-process
cases of the same rules are in test_cluster, test_zero_downtime and test_faults.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from runtime.balance import ConnectionBoard
from runtime.channel import Heartbeat, Ready, encode
from runtime.config import ServerConfig, Settings
from runtime.events import EventBus
from runtime.logs import WorkerLogs
from runtime.metrics import N_BUCKETS
from runtime.restarts import BACKOFF_BASE, STABLE_AFTER
from runtime.supervisor import KILL_GRACE, STALL, ReloadFailed, Supervisor
from runtime.workerproc import Launched, Reports, WorkerProcess

KILLED = -signal.SIGKILL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """A worker handle that does what the test says, and remembers what the rules asked of it."""

    def __init__(self, slot: int, generation: int, reports: Reports, pid: int) -> None:
        self.slot = slot
        self.generation = generation
        self.reports = reports
        self.pid: int | None = None
        self.health_problem: str | None = None
        self.signals: list[signal.Signals] = []
        self.drain_asked = False
        self.gone = False
        self._pid = pid

    # what the rules ask
    def drain(self) -> None:
        self.drain_asked = True

    def signal(self, sig: signal.Signals) -> None:
        self.signals.append(sig)

    # what the test makes happen
    def start(self) -> None:
        self.pid = self._pid
        self.reports.started(self._pid)

    def become_ready(self) -> None:
        self.reports.heard(None)
        self.reports.ready()

    def beat(self, requests: int = 0) -> None:
        self.reports.heard(Heartbeat((0, 0, requests, 0, 0, 0), (0,) * N_BUCKETS, 0, 1))

    def exit(self, code: int) -> None:
        self.gone = True
        self.reports.exited(code)


class FakeSpawner:
    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.prepared: list[int] = []
        self.kept: list[int] = []
        self.closed = False
        self.usage: dict[int, tuple[float, int]] = {}
        # What a new process does by itself, soon after it is spawned (never inside spawn(): the
        # real launch is asynchronous too). Tests replace it.
        self.on_spawn: Callable[[FakeProcess], None] = lambda p: (p.start(), p.become_ready())
        self.exit_on_drain = True

    def spawn(self, slot: int, generation: int, reports: Reports) -> FakeProcess:
        process = FakeProcess(slot, generation, reports, pid=10_000 + len(self.processes))
        original = process.drain

        def drain() -> None:
            original()
            if self.exit_on_drain and not process.gone:
                asyncio.get_running_loop().call_soon(process.exit, 0)

        process.drain = drain  # type: ignore[method-assign]
        self.processes.append(process)
        asyncio.get_running_loop().call_soon(self.on_spawn, process)
        return process

    async def prepare(self, generation: int) -> None:
        self.prepared.append(generation)

    def keep(self, generation: int) -> None:
        self.kept.append(generation)

    def configure(self, settings: Settings) -> None:
        pass

    def measure(self, pids: list[int]) -> dict[int, tuple[float, int]]:
        return {pid: self.usage[pid] for pid in pids if pid in self.usage}

    async def close(self) -> None:
        self.closed = True

    def in_slot(self, slot: int) -> list[FakeProcess]:
        return [p for p in self.processes if p.slot == slot]


class Cluster:
    def __init__(self, **server: Any) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.events = EventBus()
        self.records: list[tuple[int, int | None, str, int | None, str | None]] = []
        settings = Settings(server=ServerConfig(**{"workers": 2, **server}))
        self.sup = Supervisor(settings, self.events, self._record, self.spawner, clock=self.clock)

    def _record(self, worker_id: int, pid: int | None, event: str, exit_code: int | None, reason: str | None) -> None:
        self.records.append((worker_id, pid, event, exit_code, reason))

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def tick(self, seconds: float = 0.0) -> None:
        """Let `seconds` pass on the clock, and the supervising loop run once."""
        self.clock.now += seconds
        self.sup.wake()
        await self.settle()

    async def walk(self, seconds: float, step: float = 0.5, beat: list[FakeProcess] | None = None) -> None:
        """Let time pass in ticks shorter than STALL (a longer one reads as a stalled primary)."""
        assert step < STALL
        for _ in range(round(seconds / step)):
            for process in beat or ():
                process.beat()
            await self.tick(step)

    def current(self, slot: int) -> FakeProcess:
        worker = self.sup.slots[slot].current
        assert worker is not None
        process = worker.process
        assert isinstance(process, FakeProcess)
        return process

    def recorded(self, event: str) -> list[tuple[int, int | None, str, int | None, str | None]]:
        return [r for r in self.records if r[2] == event]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events.recent]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_start_fills_every_slot_and_a_dead_worker_is_replaced_in_its_slot_at_once() -> None:
    async def scenario() -> None:
        c = Cluster(workers=3)
        await c.sup.start()
        assert c.spawner.prepared == [1]
        assert [(p.slot, p.generation) for p in c.spawner.processes] == [(1, 1), (2, 1), (3, 1)]
        assert [r[0] for r in c.recorded("spawned")] == [1, 2, 3]
        victim = c.current(2)
        c.clock.now += STABLE_AFTER + 1  # it had been serving a while
        victim.exit(1)
        await c.tick()
        replacement = c.current(2)
        assert replacement is not victim and replacement.slot == 2
        assert c.recorded("crashed") == [(2, victim.pid, "crashed", 1, "exit code 1")]
        assert c.sup.slots[2].restarts == 1
        await c.sup.stop()
        assert c.spawner.closed

    run(scenario)


def test_a_crash_loop_backs_off_on_the_injected_clock() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1)
        await c.sup.start()
        c.current(1).exit(1)  # dies early: may be bad luck, replaced at once
        await c.tick()
        assert len(c.spawner.processes) == 2
        c.current(1).exit(1)  # again: a crash loop
        await c.tick()
        assert len(c.spawner.processes) == 2
        (row,) = c.sup.worker_snapshots(c.clock.now)
        assert row.state == "backoff" and row.backoff_seconds == BACKOFF_BASE and row.restarts == 2
        await c.tick(BACKOFF_BASE - 0.1)
        assert len(c.spawner.processes) == 2, "respawned before the back-off ran out"
        await c.tick(0.2)
        assert len(c.spawner.processes) == 3
        await c.sup.stop()

    run(scenario)


def test_an_operator_kill_is_replaced_at_once_however_often() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1)
        await c.sup.start()
        for _ in range(3):
            victim = c.current(1)
            await c.tick(1.0)
            assert c.sup.kill(1) == victim.pid
            assert victim.signals == [signal.SIGKILL]
            victim.exit(KILLED)
            await c.tick()
            assert c.current(1) is not victim
        assert [r[4] for r in c.recorded("killed")] == ["killed by operator"] * 3
        await c.sup.stop()

    run(scenario)


def test_scale_down_drains_the_highest_slots_and_scale_up_adds_new_ones() -> None:
    async def scenario() -> None:
        c = Cluster(workers=4)
        await c.sup.start()
        first = list(c.spawner.processes)
        c.sup.set_desired(2)
        await c.tick()
        assert [p.drain_asked for p in first] == [False, False, True, True]
        assert sorted(c.sup.slots) == [1, 2]
        assert sorted((r[0], r[4]) for r in c.recorded("exited")) == [(3, "scale"), (4, "scale")]
        c.sup.set_desired(3)
        await c.tick()
        assert c.spawner.processes[-1].slot == 3 and len(c.spawner.processes) == 5
        assert "cluster.scaled" in c.kinds()
        await c.sup.stop()

    run(scenario)


def test_a_rolling_restart_replaces_slot_by_slot_each_after_its_successor_is_ready() -> None:
    async def scenario() -> None:
        c = Cluster(workers=3)
        await c.sup.start()
        old = [c.current(s) for s in (1, 2, 3)]
        c.spawner.on_spawn = FakeProcess.start  # new workers wait for the test to make them ready
        reload = c.sup.reload()
        for slot in (1, 2, 3):
            await c.settle()
            new = c.spawner.processes[-1]
            assert (new.slot, new.generation) == (slot, 2)
            assert not old[slot - 1].drain_asked, "an old worker drained before its successor was ready"
            assert all(not p.drain_asked for p in old[slot:])
            new.become_ready()
            await c.settle()
            assert old[slot - 1].drain_asked
        await reload
        assert c.spawner.prepared == [1, 2] and c.spawner.kept == [2]
        assert c.sup.generation == 2
        assert [c.current(s).generation for s in (1, 2, 3)] == [2, 2, 2]
        assert [r[4] for r in c.recorded("exited")] == ["reload"] * 3
        assert c.sup.reload_snapshot() is not None and c.sup.reload_snapshot().state == "succeeded"  # type: ignore[union-attr]
        await c.sup.stop()

    run(scenario)


@pytest.mark.parametrize("failure", ["exits", "unhealthy"])
def test_a_replacement_that_fails_rolls_back_and_the_old_workers_keep_serving(failure: str) -> None:
    async def scenario() -> None:
        c = Cluster(workers=2)
        await c.sup.start()
        old = [c.current(1), c.current(2)]
        c.spawner.on_spawn = FakeProcess.start
        reload = c.sup.reload()
        await c.settle()
        new = c.spawner.processes[-1]
        if failure == "exits":
            new.exit(3)
            expected = "exited before ready (exit code 3)"
        else:
            new.reports.unhealthy("health check failed: /healthz answered 503")
            expected = "answered 503"
            assert new.signals == [signal.SIGKILL]
            new.exit(KILLED)
        with pytest.raises(ReloadFailed, match=expected.replace("(", r"\(").replace(")", r"\)")):
            await reload
        assert [c.current(1), c.current(2)] == old
        assert not any(p.drain_asked or p.signals for p in old)
        assert c.sup.generation == 1 and c.spawner.kept == [1]
        assert len(c.spawner.processes) == 3, "the restart went on past the failed slot"
        assert "cluster.reload_failed" in c.kinds()
        await c.tick()
        assert c.sup.slots[1].incoming is None and len(c.spawner.processes) == 3
        await c.sup.stop()

    run(scenario)


def test_a_slot_already_rolled_is_refilled_with_the_new_generation() -> None:
    async def scenario() -> None:
        c = Cluster(workers=2)
        await c.sup.start()
        c.spawner.on_spawn = FakeProcess.start
        reload = c.sup.reload()
        await c.settle()
        c.spawner.processes[-1].become_ready()  # slot 1 rolled
        await c.settle()
        c.clock.now += STABLE_AFTER + 1
        c.current(1).exit(1)  # then its new worker crashes, while slot 2 is still rolling
        await c.tick()
        respawned = [p for p in c.spawner.in_slot(1) if p.generation == 2]
        assert len(respawned) == 2, [(p.slot, p.generation) for p in c.spawner.processes]
        for process in c.spawner.processes[-2:]:
            process.become_ready()
        await reload
        assert [c.current(s).generation for s in (1, 2)] == [2, 2]
        await c.sup.stop()

    run(scenario)


def test_recycling_replaces_one_worker_at_a_time() -> None:
    async def scenario() -> None:
        c = Cluster(workers=2, max_requests=100)
        await c.sup.start()
        c.spawner.on_spawn = FakeProcess.start
        first, second = c.current(1), c.current(2)
        first.beat(requests=150)
        second.beat(requests=150)
        await c.tick()
        assert len(c.spawner.processes) == 3, "both recycled at once"
        await c.tick()
        assert len(c.spawner.processes) == 3
        c.spawner.processes[-1].become_ready()
        await c.tick()
        assert first.drain_asked and not second.drain_asked
        await c.tick()
        assert len(c.spawner.processes) == 4 and c.spawner.processes[-1].slot == 2
        c.spawner.processes[-1].become_ready()
        await c.tick()
        assert second.drain_asked
        reasons = [r[4] for r in c.recorded("recycled")]
        assert reasons == ["served 150 requests (max_requests 100)"] * 2
        await c.sup.stop()

    run(scenario)


def test_memory_recycling_reads_the_sampled_rss() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1, max_memory_mb=10)
        await c.sup.start()
        worker = c.sup.slots[1].current
        assert worker is not None and worker.pid is not None
        c.spawner.usage[worker.pid] = (1.0, 9 * 1024 * 1024)
        worker.rss_bytes = 9 * 1024 * 1024
        await c.tick()
        assert len(c.spawner.processes) == 1
        c.spawner.usage[worker.pid] = (1.0, 11 * 1024 * 1024)
        worker.rss_bytes = 11 * 1024 * 1024
        await c.tick()
        assert len(c.spawner.processes) == 2
        await c.tick()
        assert c.recorded("recycled")[0][4] == "RSS 11 MiB over max_memory_mb 10"
        await c.sup.stop()

    run(scenario)


def test_a_silent_worker_is_aborted_then_killed_and_replaced() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1, timeout=4)
        await c.sup.start()
        hung = c.current(1)
        await c.walk(6.0, beat=[hung])
        assert hung.signals == [], "killed while it beat"
        await c.walk(4.5)
        assert hung.signals == [signal.SIGABRT]
        await c.walk(KILL_GRACE + 0.5)
        assert hung.signals[-1] == signal.SIGKILL
        hung.exit(KILLED)
        await c.tick()
        assert c.recorded("killed")[0][4] == "no heartbeat for 4s"
        assert c.current(1) is not hung
        await c.sup.stop()

    run(scenario)


def test_a_stalled_primary_judges_no_one_until_it_has_read_what_came_meanwhile() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1, timeout=4)
        await c.sup.start()
        worker = c.current(1)
        await c.tick(0.5)
        await c.tick(30.0)  # SIGSTOP, swap: the loop ran again only now
        assert worker.signals == []
        worker.beat()  # what it sent meanwhile, read now
        await c.walk(3.0, beat=[worker])
        assert worker.signals == []
        await c.walk(4.5)  # and a real silence is still noticed
        assert worker.signals == [signal.SIGABRT]
        await c.sup.stop()

    run(scenario)


def test_a_worker_drained_while_starting_stays_draining_when_it_says_ready() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1)
        await c.sup.start()
        c.spawner.on_spawn = FakeProcess.start
        c.spawner.exit_on_drain = False
        c.sup.set_desired(2)
        await c.tick()
        late, record = c.current(2), c.sup.slots[2].current
        c.sup.set_desired(1)
        await c.tick()
        assert late.drain_asked
        late.become_ready()  # the Accept crossed the Drain on the channel
        await c.tick()
        assert record is not None and record.state == "draining" and record in c.sup.draining
        assert [r[0] for r in c.recorded("ready")] == [1], "counted ready while draining"
        late.exit(0)
        c.spawner.exit_on_drain = True
        await c.sup.stop()

    run(scenario)


def test_a_worker_not_ready_within_ready_timeout_fails_the_start() -> None:
    async def scenario() -> None:
        c = Cluster(workers=1, ready_timeout=5, timeout=30)
        await c.sup.start()
        c.spawner.on_spawn = FakeProcess.start
        c.clock.now += STABLE_AFTER + 1
        c.current(1).exit(1)
        await c.tick()
        slow = c.sup.slots[1].current
        assert slow is not None and slow.state == "starting"
        await c.walk(5.5, beat=[slow.process])  # type: ignore[list-item]
        assert slow.process.signals == [signal.SIGKILL]  # type: ignore[union-attr]
        await c.sup.stop()

    run(scenario)


def test_a_drained_worker_that_does_not_exit_is_ended_and_recorded_as_exited() -> None:
    async def scenario() -> None:
        c = Cluster(workers=2)
        await c.sup.start()
        c.spawner.exit_on_drain = False
        lingering = c.current(2)
        c.sup.set_desired(1)
        await c.tick()
        assert lingering.drain_asked
        lingering.reports.drained()  # answered everything; a non-daemon thread keeps the interpreter up
        await c.walk(KILL_GRACE - 0.5)
        assert lingering.signals == []
        await c.walk(1.0)
        assert lingering.signals == [signal.SIGKILL]
        lingering.exit(KILLED)
        await c.tick()
        ((slot, _pid, _event, code, reason),) = c.recorded("exited")
        assert slot == 2 and code == KILLED and reason is not None and reason.startswith("scale; still running")
        assert not c.recorded("killed")
        c.spawner.exit_on_drain = True
        await c.sup.stop()

    run(scenario)


def test_a_drain_past_graceful_timeout_is_killed() -> None:
    async def scenario() -> None:
        c = Cluster(workers=2, graceful_timeout=5)
        await c.sup.start()
        c.spawner.exit_on_drain = False
        slow = c.current(2)
        c.sup.set_desired(1)
        await c.tick()
        await c.walk(5 + KILL_GRACE - 0.5, beat=[slow])
        assert slow.signals == []
        await c.walk(1.0, beat=[slow])
        assert slow.signals == [signal.SIGKILL]
        slow.exit(KILLED)
        await c.tick()
        assert c.recorded("killed")[0][4] == "still draining after 5s"
        c.spawner.exit_on_drain = True
        await c.sup.stop()

    run(scenario)


def test_a_worker_that_never_starts_fails_the_boot() -> None:
    async def scenario() -> None:
        c = Cluster(workers=2)
        c.spawner.on_spawn = lambda p: (p.start(), p.reports.fatal("cannot import app 'x:y'"), p.exit(3))
        with pytest.raises(Exception, match="cannot import app"):
            await c.sup.start()
        await c.sup.stop()

    run(scenario)


# ---------------------------------------------------------------- the real handle's channel


class Heard:
    """Reports that keep what they were told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __getattr__(self, name: str) -> Callable[..., None]:
        def report(*args: Any) -> None:
            self.calls.append((name, args[0] if args else None))
            if name == "exited":
                self.exit.set_result(args[0])

        return report


def test_a_malformed_channel_message_is_skipped_and_counted() -> None:
    async def scenario() -> None:
        reports = Heard()
        board = ConnectionBoard.create()
        logs = WorkerLogs(None)
        process = WorkerProcess(1, reports, ServerConfig(), logs, board, board.claim(set()))  # type: ignore[arg-type]
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sleeper = subprocess.Popen(
            ["sh", "-c", "echo started; exec sleep 30"], stdout=out_w, stderr=err_w, process_group=0
        )
        os.close(out_w)
        os.close(err_w)

        async def start() -> Launched:
            return Launched(sleeper.pid, ours, out_r, err_r)

        await process.launch(start, lambda pid: sleeper.wait())
        heartbeat = Heartbeat((0, 0, 7, 0, 0, 0), (0,) * N_BUCKETS, 1, 2)
        lines = [
            b"not json\n",
            b'{"t":"hb"}\n',
            b'{"t":"nope"}\n',
            b"x" * 70_000 + b"\n",
            encode(heartbeat),
            encode(Ready()),
        ]
        theirs.sendall(b"".join(lines))
        while ("ready", None) not in reports.calls:
            await asyncio.sleep(0.01)
        assert process.malformed == 4
        assert ("heard", heartbeat) in reports.calls
        process.signal(signal.SIGTERM)
        assert await reports.exit == -signal.SIGTERM
        assert reports.calls[0] == ("started", sleeper.pid)
        while not logs.tail(1):  # its output, kept under its slot (run() bounds the wait)
            await asyncio.sleep(0.01)
        assert [line.text for line in logs.tail(1)] == ["started"]
        theirs.close()
        board.close()

    run(scenario)


def test_a_process_that_cannot_be_started_is_reported_as_exited() -> None:
    async def scenario() -> None:
        reports = Heard()
        board = ConnectionBoard.create()
        process = WorkerProcess(1, reports, ServerConfig(), WorkerLogs(None), board, board.claim(set()))  # type: ignore[arg-type]
        process.drain()  # asked before it exists: nothing to signal yet

        async def start() -> Launched:
            raise OSError(24, "Too many open files")

        await process.launch(start, lambda pid: 0)
        assert reports.calls == [("fatal", "cannot start a worker process: Too many open files"), ("exited", 127)]
        assert process.gone and process.pid is None
        board.close()

    run(scenario)
