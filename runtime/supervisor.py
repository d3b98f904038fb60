"""The supervisor: reconciles the actual workers to the desired count.

The shape is gunicorn's arbiter, on asyncio. Actions (scale, reload, kill,
stop) and signals only change the desired state and wake one loop; that loop
spawns missing workers, drains surplus ones, replaces recycled ones and
murders hung ones. Worker exits arrive through a pidfd registered with the
loop, so a dead worker is noticed the moment it dies, not at the next poll.

Each slot (1..N, `CLUSTERCTL_WORKER_ID`) holds at most one serving worker
(`current`) and one being started to take its place (`incoming`, during a
rolling restart or a recycle). A replaced worker is drained: it stops
accepting, answers the requests it has with `Connection: close`, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import balance
from .balance import ConnectionBoard
from .channel import EXIT_BOOT_ERROR, SPEC_ENV, health_socket_name
from .config import MAX_WORKERS, ConfigError, Settings, read_env_file
from .events import EventBus
from .listeners import Listener
from .logs import OutputReader, WorkerLogs
from .metrics import WorkerStats, merge, percentile
from .restarts import RestartPolicy
from .snapshot import ReloadSnapshot, WorkerSnapshot

TICK = 0.25  # seconds between checks for hung workers and expired back-offs
KILL_GRACE = 2.0  # after SIGABRT (or the drain deadline), SIGKILL
HEARTBEAT_INTERVAL_MAX = 1.0
STALL = 1.0  # a tick this late means the primary itself was stalled (SIGSTOP, swap, a blocked loop)


class BootError(Exception):
    """The first workers could not start (the app does not import, or dies at once)."""


class ReloadFailed(Exception):
    pass


class ReloadInterrupted(ReloadFailed):
    """The rolling restart was cut short because the cluster began to stop."""


class ReloadRefused(ReloadFailed):
    """The config file no longer validates: nothing changed, nothing restarted."""


@dataclass(eq=False)
class WorkerProc:
    slot: int
    generation: int
    proc: subprocess.Popen[bytes]
    spawned_at: float
    last_seen: float
    recycle_after: int
    board_index: int = 0
    state: str = "starting"
    ready_at: float | None = None
    heard: bool = False
    fatal: str | None = None
    health_problem: str | None = None
    kill_reason: str | None = None
    killed_at: float | None = None
    drain_reason: str | None = None
    recycling: bool = False
    drain_deadline: float | None = None
    writer: asyncio.StreamWriter | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    connections: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    ready: asyncio.Future[None] | None = None
    exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done()

    def send(self, message: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


@dataclass(eq=False)
class Slot:
    id: int
    current: WorkerProc | None = None
    incoming: WorkerProc | None = None
    restarts: int = 0
    last_exit: str | None = None
    policy: RestartPolicy = field(default_factory=RestartPolicy)

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


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        listener: Listener,
        events: EventBus,
        logs: WorkerLogs,
        record: Callable[..., None],
    ) -> None:
        self.settings = settings
        self.server = settings.server
        self.listener = listener
        self.events = events
        self.logs = logs
        self.record = record  # (worker_id, pid, event, exit_code, reason) → worker_events
        self.desired = settings.server.workers
        self.generation = 1
        self.slots: dict[int, Slot] = {}
        self.draining: set[WorkerProc] = set()
        self.stopping = False
        self.reload_state: _Reload | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._psutil: dict[int, psutil.Process] = {}
        self.heartbeat_interval = min(HEARTBEAT_INTERVAL_MAX, self.server.timeout / 4)
        self._last_check = time.monotonic()
        self._judge_after = 0.0
        self.board = ConnectionBoard.create()

    # ------------------------------------------------------------------ public actions

    async def start(self) -> None:
        """Spawn the first workers and wait until every one is ready; BootError if the app cannot start."""
        for slot_id in range(1, self.desired + 1):
            slot = self.slots[slot_id] = Slot(slot_id)
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
        self._kill(worker, reason, signal.SIGKILL)
        return worker.pid

    def configure(self, settings: Settings) -> None:
        """Settings re-read by a reload: the workers started from now on (the restart's) get them."""
        self.settings = settings
        self.server = settings.server
        self.heartbeat_interval = min(HEARTBEAT_INTERVAL_MAX, self.server.timeout / 4)

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
        pending = [w.exited for w in self._all_workers() if w.exited is not None and not w.exited.done()]
        if pending:
            await asyncio.wait(pending)
        for task in self._tasks:
            task.cancel()
        self.board.close()

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

    def _worker_row(self, slot: Slot, worker: WorkerProc, now: float) -> WorkerSnapshot:
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

    def _all_workers(self) -> list[WorkerProc]:
        workers = [w for slot in self.slots.values() for w in (slot.current, slot.incoming) if w is not None]
        return workers + list(self.draining)

    # ------------------------------------------------------------------ spawning

    def _spawn(self, slot_id: int, generation: int) -> WorkerProc:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fds = [s.fileno() for s in self.listener.sockets_for_worker(slot_id)]
        board_index = self.board.claim({w.board_index for w in self._all_workers()})
        spec = {
            "board_fd": self.board.fd,
            "board_index": board_index,
            "target": self.settings.app.target,
            "interface": self.settings.app.interface,
            "listen_fds": listen_fds,
            "channel_fd": theirs.fileno(),
            "heartbeat_interval": self.heartbeat_interval,
            "keepalive_timeout": self.server.keepalive_timeout,
            "header_timeout": self.server.header_timeout,
            "graceful_timeout": self.server.graceful_timeout,
            "forwarded_allow_ips": self.server.forwarded_allow_ips,
            "access_log": self.server.access_log,
        }
        app_env = dict(self.server.env_file_values)
        if self.server.env_file is not None:
            # Read at each spawn, so a reload picks up an edit without restarting the primary; one that
            # cannot be read any more (mid-deploy) must not leave the worker without its settings.
            try:
                app_env = read_env_file(self.server.env_file)
            except ConfigError as exc:
                print(f"clusterctl: env_file: {exc}; the worker gets the values read at start", file=sys.stderr)
        # The primary's own environment wins over the file, as with python-dotenv's load_dotenv().
        env = {**app_env, **os.environ}
        env.update(
            {
                "CLUSTERCTL_INSTANCE_TYPE": "worker",
                "CLUSTERCTL_WORKER_ID": str(slot_id),
                "CLUSTERCTL_PRIMARY_PID": str(os.getpid()),
                "CLUSTERCTL_DB": str(self.settings.store.path),
                "CLUSTERCTL_GENERATION": str(generation),
                "PYTHONUNBUFFERED": "1",
                SPEC_ENV: json.dumps(spec),
            }
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.worker"],
                pass_fds=(*listen_fds, theirs.fileno(), self.board.fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                # Its own process group: Ctrl+C in the primary's terminal is the primary's to handle.
                process_group=0,
            )
        finally:
            theirs.close()
        now = time.monotonic()
        jitter = random.randint(0, self.server.max_requests_jitter) if self.server.max_requests else 0
        worker = WorkerProc(
            slot=slot_id,
            generation=generation,
            proc=proc,
            spawned_at=now,
            last_seen=now,
            recycle_after=self.server.max_requests + jitter,
            board_index=board_index,
            ready=loop.create_future(),
            exited=loop.create_future(),
        )
        worker.ready.add_done_callback(_consume_exception)
        self._watch_exit(worker)
        for stream, name in ((proc.stdout, "out"), (proc.stderr, "err")):
            assert stream is not None
            self._watch_output(worker, stream.fileno(), name)
        self._spawn_task(self._channel(worker, ours))
        if slot_id in self.slots:
            self.slots[slot_id].policy.spawned()
        self.record(slot_id, proc.pid, "spawned", None, f"generation {generation}")
        self.events.publish(
            "worker.spawned", f"spawned (generation {generation})", slot_id, proc.pid, generation=generation
        )
        return worker

    def _watch_exit(self, worker: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(worker.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            code = worker.proc.wait()
            assert worker.exited is not None
            worker.exited.set_result(code)
            self._on_exit(worker, code)

        loop.add_reader(pidfd, on_exit)

    def _watch_output(self, worker: WorkerProc, fd: int, stream: str) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        reader = OutputReader(self.logs, worker.slot, worker.pid, stream)

        def on_readable() -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk:
                reader.feed(chunk)
            else:
                loop.remove_reader(fd)
                reader.close()

        loop.add_reader(fd, on_readable)

    async def _channel(self, worker: WorkerProc, sock: socket.socket) -> None:
        reader, worker.writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self._on_message(worker, message)
        except (ConnectionError, OSError):
            pass
        finally:
            worker.writer.close()

    def _on_message(self, worker: WorkerProc, message: dict[str, Any]) -> None:
        now = time.monotonic()
        worker.last_seen = now
        worker.heard = True
        kind = message.get("t")
        if kind == "hb":
            worker.stats.update(message["c"], message["h"], message["f"], now)
            worker.connections = message.get("n", 0)
        elif kind == "boot":
            if self.server.health_path:
                self._spawn_task(self._health_check(worker))
            else:
                worker.send({"t": "accept"})
        elif kind == "ready":
            worker.state = "ready"
            worker.ready_at = now
            self.record(worker.slot, worker.pid, "ready", None, None)
            self.events.publish("worker.ready", "ready", worker.slot, worker.pid)
            assert worker.ready is not None
            if not worker.ready.done():
                worker.ready.set_result(None)
            self.wake()
        elif kind == "fatal":
            worker.fatal = str(message.get("error"))

    async def _health_check(self, worker: WorkerProc) -> None:
        """GET health_path on this very worker, over its private socket, until 2xx/3xx or the deadline."""
        path = self.server.health_path
        name = health_socket_name(os.getpid(), worker.pid)
        deadline = time.monotonic() + self.server.ready_timeout
        while worker.alive and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_unix_connection(name)
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                    status_line = await reader.readline()
                    writer.close()
                parts = status_line.split()
                code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                if 200 <= code < 400:
                    worker.send({"t": "accept"})
                    return
                worker.health_problem = f"health check failed: {path} answered {code or 'no HTTP status'}"
            except (OSError, TimeoutError) as exc:
                worker.health_problem = f"health check failed: {path}: {exc or type(exc).__name__}"
            await asyncio.sleep(0.2)
        if worker.alive:
            self._fail_start(worker, worker.health_problem or "health check failed")

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while True:
            try:
                self._reconcile(time.monotonic())
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
        for slot_id in range(1, self.desired + 1):
            slot = self.slots.setdefault(slot_id, Slot(slot_id))
            if slot.incoming is not None and slot.incoming.state == "ready":
                self._promote(slot)
            if slot.current is None and slot.incoming is None and now >= slot.backoff_until:
                slot.current = self._spawn(slot_id, self.generation)
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
                    self._signal(worker, signal.SIGKILL)
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

    def _drain(self, worker: WorkerProc, reason: str) -> None:
        worker.state = "draining"
        self.board.set(worker.board_index, balance.OFF)  # no one defers to a worker that has stopped accepting
        worker.drain_reason = worker.drain_reason or reason
        worker.drain_deadline = time.monotonic() + self.server.graceful_timeout + KILL_GRACE
        for slot in self.slots.values():
            if slot.current is worker:
                slot.current = None
            if slot.incoming is worker:
                slot.incoming = None
        self.draining.add(worker)
        if worker.writer is not None and not worker.writer.is_closing():
            worker.send({"t": "drain"})
        else:
            self._signal(worker, signal.SIGTERM)

    def _kill(self, worker: WorkerProc, reason: str, sig: signal.Signals) -> None:
        if worker.kill_reason is None:
            worker.kill_reason = reason
            worker.killed_at = time.monotonic()
        self._signal(worker, sig)

    def _fail_start(self, worker: WorkerProc, reason: str) -> None:
        worker.fatal = worker.fatal or reason
        assert worker.ready is not None
        if not worker.ready.done():
            worker.ready.set_exception(ReloadFailed(f"worker {worker.slot} (pid {worker.pid}): {reason}"))
        self._kill(worker, reason, signal.SIGKILL)

    @staticmethod
    def _signal(worker: WorkerProc, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(sig)

    def _on_exit(self, worker: WorkerProc, code: int) -> None:
        slot = self.slots.get(worker.slot)
        self.draining.discard(worker)
        if slot is not None:
            if slot.current is worker:
                slot.current = None
            if slot.incoming is worker:
                slot.incoming = None
        self.board.set(worker.board_index, balance.OFF)
        how = _describe_exit(code)
        assert worker.ready is not None
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
        self._end_group(worker)
        self.wake()

    def _end_group(self, worker: WorkerProc) -> None:
        """Whatever the worker forked dies with it: a grandchild must not keep the port (or run on)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)

    async def _abort_all(self) -> None:
        workers = self._all_workers()
        for worker in workers:
            self._signal(worker, signal.SIGKILL)
        pending = [w.exited for w in workers if w.exited is not None and not w.exited.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)

    # ------------------------------------------------------------------ rolling restart

    async def _rolling_restart(self) -> None:
        generation = self.generation + 1
        slot_ids = sorted(s for s in self.slots if s <= self.desired)
        state = self.reload_state = _Reload(generation, len(slot_ids))
        self.events.publish("cluster.reload_started", f"rolling restart to generation {generation}")
        replaced: list[WorkerProc] = []
        batch = self.server.reload_batch
        try:
            for start in range(0, len(slot_ids), batch):
                incoming: list[WorkerProc] = []
                for slot_id in slot_ids[start : start + batch]:
                    slot = self.slots.get(slot_id)
                    if slot is None:
                        continue
                    if slot.incoming is not None:  # a recycle in flight: let it finish first
                        with contextlib.suppress(ReloadFailed):
                            assert slot.incoming.ready is not None
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
                    state.done += 1
            self.generation = generation
            pending = [w.exited for w in replaced if w.exited is not None and not w.exited.done()]
            if pending:
                await asyncio.wait(pending, timeout=self.server.graceful_timeout + 2 * KILL_GRACE)
        except ReloadFailed as exc:
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

    async def _wait_ready(self, workers: list[WorkerProc]) -> None:
        """Until every one is ready; ReloadFailed naming the first that died, failed its check or was too slow."""
        try:
            async with asyncio.timeout(self.server.ready_timeout):
                for worker in workers:
                    assert worker.ready is not None
                    await worker.ready
        except TimeoutError:
            reason = f"not ready within {self.server.ready_timeout:g}s"
            problems = [f"worker {w.slot} (pid {w.pid}): {w.health_problem}" for w in workers if w.health_problem]
            raise ReloadFailed(f"{reason} ({problems[0]})" if problems else reason) from None

    # ------------------------------------------------------------------ resources

    async def _sample_resources(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            workers = [w for w in self._all_workers() if w.alive]
            samples = await asyncio.to_thread(self._measure, [w.pid for w in workers])
            now = time.monotonic()
            for worker in workers:
                worker.cpu_percent, worker.rss_bytes = samples.get(worker.pid, (0.0, 0))
                worker.stats.tick_history(now)

    def _measure(self, pids: list[int]) -> dict[int, tuple[float, int]]:
        out: dict[int, tuple[float, int]] = {}
        for gone in set(self._psutil) - set(pids):
            del self._psutil[gone]
        for pid in pids:
            try:
                proc = self._psutil.get(pid)
                if proc is None:
                    proc = self._psutil[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)
                with proc.oneshot():
                    out[pid] = (proc.cpu_percent(None), proc.memory_info().rss)
            except psutil.Error:
                continue
        return out

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
