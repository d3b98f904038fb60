"""The primary: binds once, owns the store, the supervisor and the control socket.

`Primary` is the runtime's public face. The headless CLI and the Textual
console drive the same object: `start()`, then `snapshot()` as often as they
like, actions (`scale`, `reload`, `kill_worker`, `request_stop`), and
`wait()` until the cluster has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil

from . import commands, systemd, wire
from .cli import version
from .config import ConfigError, Settings
from .control import ControlError, ControlServer, Feed, socket_path
from .demo import with_demo_extras
from .errors import BootError, ReloadInterrupted, ReloadRefused
from .events import Event, EventBus
from .listeners import BindError, Listener, bind, inherit
from .logs import LogLine, WorkerLogs
from .metrics import HISTORY, percentile
from .outbox import SecretError, resolve_secret
from .prometheus import MetricsError, MetricsExporter
from .scheduler import Scheduler
from .snapshot import ClusterSnapshot, Delivery, JobRun, PrimaryRow
from .store import STORE_ERRORS, AsyncStore, StoreError, open_store, utc_now_iso
from .supervisor import Supervisor
from .webhooks import WebhookRunner

HOUSEKEEPING_INTERVAL = 1.0
HEARTBEAT_INTERVAL = 2.0  # seconds between writes of this primary's row in `primaries`
LIVE_WITHIN = 3 * HEARTBEAT_INTERVAL  # a primary whose row is older than this is not listed as live
FEED_INTERVAL = 0.1  # seconds between sends of an attached console's events and output
FEED_SNAPSHOT_INTERVAL = 1.0
FEED_EVENTS = 1000  # buffered per attached console; a reader that falls further behind loses the oldest
FEED_LINES = 5000
FEED_TAIL = 40  # lines of each worker's output sent when a console attaches
PRUNE_EVERY = 3600.0
_version = functools.cache(version)  # what heartbeats say; looked up once


class StartupError(Exception):
    """The cluster cannot start; the message names the problem (the CLI exits 2)."""


class Primary:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.events = EventBus()
        self.started_at = ""
        self.store: AsyncStore | None = None
        self.logs: WorkerLogs | None = None
        self.echo: int | None = None  # a descriptor that also gets every worker line (headless: stderr)
        self.listener: Listener | None = None
        self.systemd: systemd.ServiceNotifier | None = None  # speaking to systemd, when it listens
        self.control: ControlServer | None = None
        self.supervisor: Supervisor | None = None
        self.scheduler: Scheduler | None = None
        self.webhooks: WebhookRunner | None = None
        self.metrics: MetricsExporter | None = None  # /metrics, when [metrics] bind is set
        self.webhook_counts = {"pending": 0, "failed": 0, "delivered": 0, "dead": 0}
        self.primary_cpu = 0.0
        self.primary_rss = 0
        self.rps_history: deque[float] = deque(maxlen=HISTORY)
        self._stopped: asyncio.Event | None = None
        self._stop_requested: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signals: list[int] = []
        self.running = False  # started, and not yet stopping
        self._withheld: dict[str, str] = {}  # env: webhook secrets, kept here only, for a reload to resolve again
        self.config_changes: list[str] = []  # what the last reload took from the config file
        self.primaries: tuple[PrimaryRow, ...] = ()  # the live primaries on the store, as last read

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind, open the store, run before_start, start the workers. StartupError leaves nothing running.

        A stop asked for while starting (SIGTERM during a slow app import) ends the start-up and
        drains what was started; `start()` then returns and `wait()` returns at once.
        """
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        # First of all: a HUP or TERM at any moment of start-up is ours to handle, never a kill.
        self._install_signals()
        # Before any child exists: NOTIFY_SOCKET leaves our environment here, so none speaks for the service.
        self.systemd = systemd.ServiceNotifier.attach(self)
        starting = asyncio.ensure_future(self._start())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                await asyncio.wait({starting})
                self.events.publish("cluster.stopping", "stop requested during start-up")
                await self._close()
                return
            starting.result()
        except BaseException:
            starting.cancel()
            await self._close()
            raise
        finally:
            stop.cancel()
        self.started_at = utc_now_iso()
        self.running = True
        if self.systemd is not None:
            self.systemd.ready()

    async def _start(self) -> None:
        settings = self.settings
        store_path = settings.store.path
        try:
            for hook in settings.webhooks:
                resolve_secret(hook.secret, hook.name)
            self.listener = self._listen()
            # Bound beside the app's port: a taken port stops the start before any worker runs.
            self.metrics = MetricsExporter.serve(settings.metrics.bind) if settings.metrics.bind else None
        except (SecretError, BindError, MetricsError) as exc:
            raise StartupError(str(exc)) from None
        # Only now, with the port ours, may this primary touch state it shares with others on the store.
        try:
            self.store = AsyncStore(open_store(settings.store))
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.webhooks = WebhookRunner(settings.webhooks, self.store, self.events, self.pid)
        self._withheld.update(_withhold_secrets(settings))
        try:
            self.logs = WorkerLogs(store_path.parent / "logs", echo=self.echo)
        except OSError as exc:
            raise StartupError(f"cannot write logs beside the store: {exc.strerror or exc}") from None
        self.control = ControlServer(socket_path(store_path, self.pid), self._handle)
        try:
            await self.control.start()
        except ControlError as exc:
            raise StartupError(str(exc)) from None
        await self._before_start()
        self.supervisor = Supervisor.for_processes(settings, self.listener, self.events, self.logs, self._record)
        try:
            await self.supervisor.start()
        except BootError as exc:
            raise StartupError(f"app {settings.app.target!r} did not start: {exc}") from None
        await self.webhooks.start()
        self.scheduler = Scheduler(settings.jobs, self.store, self.events, self.primary_env(), self.pid)
        await self.scheduler.start()
        self._spawn(self._housekeeping())
        if self.metrics is not None:
            self.metrics.watch(self)
        self.events.publish(
            "cluster.started",
            f"serving {settings.app.target} on {self.listener.address} with {self.supervisor.desired} workers",
        )

    def _listen(self) -> Listener:
        """The sockets systemd passed (socket activation), else `bind` bound by us."""
        fds = systemd.listen_fds()
        if not fds:
            return bind(self.settings.server.bind, self.settings.server.socket_mode)
        listener = inherit(fds)
        self.events.publish(
            "cluster.listening",
            f"serving the socket systemd passed in (LISTEN_FDS={len(fds)}: {listener.address});"
            f" bind {self.settings.server.bind} is not used",
        )
        return listener

    async def wait(self) -> None:
        """Return once a stop was requested and the cluster has drained."""
        assert self._stop_requested is not None and self._stopped is not None
        await self._stop_requested.wait()
        await self._close()

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def _close(self) -> None:
        assert self._stopped is not None
        if self._stopped.is_set():
            return
        self.running = False
        if self.systemd is not None:
            self.systemd.stopping()
        if self.supervisor is not None and self.supervisor.slots:
            self.events.publish("cluster.stopping", "stopping: draining all workers")
        for sig in self._signals:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(sig)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        for task in list(self._tasks):
            task.cancel()
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()
        if self.listener is not None:
            self.listener.close()
        if self.logs is not None:
            self.logs.close()
        if self.store is not None:
            with contextlib.suppress(*STORE_ERRORS):  # unreachable: the row ages out of the list instead
                await self.store.call(self.store.store.forget_primary, self.pid)
            self.store.close()
        if self.systemd is not None:
            self.systemd.close()
        self._stopped.set()
        self.events.publish("cluster.stopped", "stopped")

    async def _before_start(self) -> None:
        argv = list(self.settings.app.before_start)
        if not argv:
            return
        # Run as the workers run: "python" is the interpreter that serves the app (the venv's, even
        # when no venv is activated), and the venv's scripts (django-admin, alembic) come first on PATH.
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        bindir = os.path.dirname(sys.executable)
        env = {**os.environ, **self.primary_env(), "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
        self.events.publish("cluster.before_start", f"running before_start: {' '.join(argv)}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        except OSError as exc:
            raise StartupError(f"before_start {argv[0]!r} cannot run: {exc.strerror or exc}") from None
        output, _ = await proc.communicate()
        lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
        for line in lines[-20:]:
            self.events.publish("cluster.before_start.output", line)
        if proc.returncode != 0:
            last = f": {lines[-1].strip()}" if lines else ""
            raise StartupError(
                f"before_start {' '.join(argv)!r} failed with exit code {proc.returncode}{last}; no worker started"
            )

    def _on_signal(self, sig: signal.Signals) -> None:
        cmd, args = commands.SIGNALS[sig]
        if cmd != "stop" and not self.running:
            # The workers being started already run the current code and count.
            self.events.publish("cluster.signal", f"{sig.name} during start-up or shutdown: ignored")
            return
        self._spawn(self._signalled(sig, cmd, args))

    async def _signalled(self, sig: signal.Signals, cmd: str, args: dict[str, Any]) -> None:
        try:
            await commands.dispatch(self, cmd, args)
        except (ControlError, ValueError) as exc:
            self.events.publish("cluster.signal", f"{sig.name}: {exc}")

    def primary_env(self) -> dict[str, str]:
        """The environment of the primary's own child processes (before_start, jobs)."""
        return {
            "CLUSTERCTL_INSTANCE_TYPE": "primary",
            "CLUSTERCTL_PRIMARY_PID": str(self.pid),
            "CLUSTERCTL_DB": self.settings.store.db,
        }

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in commands.SIGNALS:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
                continue
            self._signals.append(sig)

    # ------------------------------------------------------------------ actions

    @property
    def desired_workers(self) -> int:
        return self.supervisor.desired if self.supervisor else self.settings.server.workers

    def scale(self, count: int) -> int:
        assert self.supervisor is not None
        return self.supervisor.set_desired(count)

    def scale_by(self, delta: int) -> int:
        return self.scale(self.desired_workers + delta)

    def kill_worker(self, worker_id: int) -> int:
        assert self.supervisor is not None
        return self.supervisor.kill(worker_id)

    async def reload(self) -> int:
        """Re-read the config file and apply it, then a rolling restart; returns the new generation.

        ReloadRefused (nothing changed) if the file no longer validates; ReloadFailed if the restart
        rolled back; ReloadInterrupted if the cluster began to stop meanwhile.
        """
        assert self.supervisor is not None
        if not self.supervisor.reloading:  # joining a restart under way: its config is read already
            self.config_changes = await self._reread()
        task = self.supervisor.reload()
        await asyncio.wait({task})  # not `await task`: its cancellation by a stop is not ours
        if task.cancelled():
            raise ReloadInterrupted("the cluster is stopping")
        task.result()
        return self.supervisor.generation

    async def _reread(self) -> list[str]:
        """Take what the config file says now, like gunicorn's HUP; returns the changes, in words."""
        assert self.supervisor is not None and self.scheduler is not None and self.webhooks is not None
        old = self.settings
        try:
            new = with_demo_extras(old.reread())
            environ = {**os.environ, **self._withheld}
            keys = {hook.name: resolve_secret(hook.secret, hook.name, environ) for hook in new.webhooks}
        except (ConfigError, SecretError) as exc:
            raise ReloadRefused(f"the config no longer validates, nothing changed: {exc}") from None
        changes = []
        # What a running primary cannot take: the socket it serves and the store it shares.
        if new.server.bind != old.server.bind:
            changes.append(f"bind {old.server.bind} -> {new.server.bind}: not applied (restart the primary)")
            new = dataclasses.replace(new, server=dataclasses.replace(new.server, bind=old.server.bind))
        if new.store.path != old.store.path:
            changes.append(f"store {old.store.path} -> {new.store.path}: not applied (restart the primary)")
            new = dataclasses.replace(new, store=old.store)
        if new.store.url != old.store.url:  # named, never shown: a URL may hold a password
            changes.append("store url changed: not applied (restart the primary)")
            new = dataclasses.replace(new, store=dataclasses.replace(new.store, url=old.store.url))
        for section in ("app", "server", "store"):
            before, after = getattr(old, section), getattr(new, section)
            for field in dataclasses.fields(before):
                was, now = getattr(before, field.name), getattr(after, field.name)
                if was != now and field.repr:
                    changes.append(f"{section}.{field.name} {was!r} -> {now!r}")
        if new.metrics.bind != old.metrics.bind:
            changes.append(f"metrics.bind {old.metrics.bind!r} -> {new.metrics.bind!r}")
            try:
                exporter = MetricsExporter.serve(new.metrics.bind) if new.metrics.bind else None
            except MetricsError as exc:
                raise ReloadRefused(f"nothing changed: {exc}") from None
            if self.metrics is not None:
                await self.metrics.close()
            self.metrics = exporter
            if exporter is not None:
                exporter.watch(self)
        if new.server.workers != old.server.workers:
            self.supervisor.set_desired(new.server.workers)
        self.supervisor.configure(new)
        changes += await self.scheduler.update(new.jobs)
        changes += await self.webhooks.update(new.webhooks, keys)
        self._withheld.update(_withhold_secrets(new))
        self.settings = new
        self.events.publish(
            "cluster.config", f"config re-read: {'; '.join(changes) if changes else 'no change'}", changes=changes
        )
        return changes

    async def run_job(self, name: str) -> int:
        """Run a job now (a manual run); returns the run id. LookupError for an unknown job."""
        assert self.scheduler is not None
        return await self.scheduler.run_now(name)

    async def set_job_paused(self, name: str, paused: bool) -> None:
        assert self.scheduler is not None
        await self.scheduler.set_paused(name, paused)

    async def replay_delivery(self, delivery_id: int) -> list[int]:
        """Queue a delivery again (same webhook-id); returns the new delivery ids."""
        assert self.store is not None
        return await self.store.call(self.store.store.replay, delivery_id=delivery_id)

    async def job_history(self, job: str | None = None, status: str | None = None, limit: int = 100) -> list[JobRun]:
        assert self.store is not None
        rows = await self.store.call(self.store.store.job_history, job, status, limit)
        return [JobRun(**row) for row in rows]

    async def deliveries(self, limit: int = 100) -> list[Delivery]:
        assert self.store is not None
        rows = await self.store.call(self.store.store.deliveries, limit)
        return [Delivery(**row) for row in rows]

    async def endpoint_queues(self) -> dict[str, dict[str, int]]:
        """Per endpoint: deliveries by status, from the store."""
        assert self.store is not None
        return await self.store.call(self.store.store.endpoint_counts)

    async def call(self, command: str, **args: Any) -> Any:
        """Run one of runtime.commands here, as the control socket would (the in-process console's way)."""
        return await commands.dispatch(self, command, args)

    def subscribe_logs(self, callback: Callable[[list[LogLine]], None]) -> Callable[[], None]:
        """The lines workers write, in batches on the loop (the console's log view); returns the unsubscribe."""
        assert self.logs is not None
        return self.logs.subscribe(callback)

    def worker_tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        return self.logs.tail(worker_id, limit) if self.logs else []

    # ------------------------------------------------------------------ observation

    def snapshot(self) -> ClusterSnapshot:
        assert self.supervisor is not None and self.listener is not None
        sup = self.supervisor
        now = time.monotonic()
        workers = tuple(sup.worker_snapshots(now))
        histogram = sup.window_histogram()
        errors = requests = 0
        for stats in sup.live_stats():
            e, r = stats.window_errors()
            errors, requests = errors + e, requests + r
        return ClusterSnapshot(
            pid=self.pid,
            bind=self.listener.address,
            desired_workers=sup.desired,
            generation=sup.generation,
            workers=workers,
            requests_per_second=round(sum(w.requests_per_second for w in workers), 2),
            p50_ms=round(percentile(histogram, 0.50), 3),
            p99_ms=round(percentile(histogram, 0.99), 3),
            error_rate=round(errors / requests, 4) if requests else 0.0,
            cpu_percent=round(sum(w.cpu_percent for w in workers), 1),
            rss_bytes=sum(w.rss_bytes for w in workers),
            primary_cpu_percent=self.primary_cpu,
            primary_rss_bytes=self.primary_rss,
            rps_history=tuple(self.rps_history),
            reload=sup.reload_snapshot(),
            jobs=tuple(self.scheduler.snapshot()) if self.scheduler else (),
            endpoints=tuple(self.webhooks.snapshot()) if self.webhooks else (),
            webhooks=dict(self.webhook_counts),
            store_error=self.store.last_error if self.store else None,
            started_at=self.started_at,
            primaries=self.primaries,
        )

    def _record(self, worker_id: int, pid: int | None, event: str, exit_code: int | None, reason: str | None) -> None:
        assert self.store is not None
        self.store.submit(self.store.store.record_worker_event, worker_id, pid, event, exit_code, reason, self.pid)

    async def _housekeeping(self) -> None:
        assert self.store is not None and self.supervisor is not None
        me = psutil.Process()
        me.cpu_percent(None)
        last_prune = last_beat = 0.0
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.primary_cpu = me.cpu_percent(None)
            self.primary_rss = me.memory_info().rss
            self.rps_history.append(round(sum(s.rate(time.monotonic()) for s in self.supervisor.live_stats()), 2))
            try:
                # SQLite writes on to a deleted file without a word, and so would every worker's emit():
                # all of it lost. Move to the file at the path (a new one, endpoints published) and say so.
                problem = await self.store.call(self.store.store.file_problem)
                if problem is not None:
                    await self.store.call(self.store.store.reopen)
                    message = (
                        f"{problem}: now writing to the file at that path; what was written to the old one"
                        f" before {utc_now_iso()} is not in it"
                    )
                    self.store.report(message)
                    self.events.publish("store.replaced", message)
                counts = await self.store.call(self.store.store.webhook_counts)
                self.webhook_counts = counts
                if time.monotonic() - last_beat >= HEARTBEAT_INTERVAL:
                    last_beat = time.monotonic()
                    await self._heartbeat()
                if time.monotonic() - last_prune > PRUNE_EVERY:
                    last_prune = time.monotonic()
                    keep = self.settings.store
                    await self.store.call(self.store.store.prune_worker_events, keep_days=keep.keep_days)
                    await self.store.call(self.store.store.prune_job_runs, keep.keep_runs, keep.keep_days)
                    await self.store.call(self.store.store.prune_webhooks, keep.keep_days)
            except Exception as exc:  # the store may be full, read-only or unreachable: say so, keep serving
                self.store.last_error = f"store {self.settings.store.label}: {exc}"

    async def _heartbeat(self) -> None:
        """This primary's row in `primaries` (a write: when it goes through, earlier store errors are
        over), then every live primary's, for `status` and the console."""
        assert self.store is not None and self.supervisor is not None and self.listener is not None
        db = self.store.store
        ready = sum(1 for w in self.supervisor.worker_snapshots(time.monotonic()) if w.state == "ready")
        started = self.started_at or utc_now_iso()
        await self.store.call(db.heartbeat, self.pid, self.listener.address, ready, _version(), started)
        self.store.wrote()
        rows = await self.store.call(db.live_primaries, LIVE_WITHIN)
        self.primaries = tuple(PrimaryRow(**row) for row in rows)

    # ------------------------------------------------------------------ control socket

    async def _handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if self.supervisor is None and cmd != "stop":
            raise ControlError("the primary is still starting; try again in a moment")
        return await commands.dispatch(self, cmd, args)

    def feed(self) -> Feed:
        """The live feed of an attached console: what it missed first, then snapshots, events and output.

        Producers only append to this reader's bounded buffers (a slow reader loses the oldest),
        and one loop here sends them at its own pace: the supervising loop never waits on a reader.
        """
        events: deque[Event] = deque(self.events.recent, maxlen=FEED_EVENTS)
        lines: deque[LogLine] = deque(maxlen=FEED_LINES)
        assert self.logs is not None
        for worker_id in sorted(self.logs.tails):
            lines.extend(self.logs.tail(worker_id, FEED_TAIL))
        unsubscribe_events = self.events.subscribe(events.append)
        unsubscribe_logs = self.subscribe_logs(lines.extend)

        async def feed() -> AsyncIterator[bytes]:
            snapshot_due = 0.0
            while True:
                now = time.monotonic()
                if now >= snapshot_due:
                    snapshot_due = now + FEED_SNAPSHOT_INTERVAL
                    yield wire.message(wire.SNAPSHOT, self.snapshot())
                for kind, buffer in ((wire.EVENTS, events), (wire.LOGS, lines)):
                    if buffer:
                        batch = list(buffer)
                        buffer.clear()
                        yield wire.message(kind, batch)
                await asyncio.sleep(FEED_INTERVAL)

        def close() -> None:
            unsubscribe_events()
            unsubscribe_logs()

        return Feed(feed(), wire.message(wire.BYE, "the primary is stopping"), close)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _withhold_secrets(settings: Settings) -> dict[str, str]:
    """Drop `env:` webhook secrets from our environment once resolved: workers, jobs and before_start
    inherit it, and app code (or a job that runs `env`) has no business with them. Returns what was dropped."""
    withheld = {}
    for hook in settings.webhooks:
        name = hook.secret[4:] if hook.secret.startswith("env:") else None
        if name and name in os.environ:
            withheld[name] = os.environ.pop(name)
    return withheld
