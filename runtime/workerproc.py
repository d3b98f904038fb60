"""A worker process as the primary sees it: how it is started, heard, checked, sampled and ended.

`WorkerProcess` is the handle of one process. It owns the plumbing: the
launch (a fork of the generation's fork server, or a fresh interpreter when
there is none), the pidfd that tells the loop the moment the process dies,
the pipes of its stdout and stderr (into `runtime.logs`), the channel
(decoded into `runtime.channel`'s messages), the health check before it may
accept, signals, and the end of its process group. It decides nothing: what
happens reaches the supervisor through `Reports`, and the supervisor's rules
(`runtime.supervisor`) answer with `drain()` or `signal()`.

`ProcessSpawner` makes handles for the supervisor and owns what they share:
the connection board, the worker environment and the fork servers.
`ResourceSampler` reads CPU and RSS with psutil, off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from . import balance
from .balance import ConnectionBoard
from .channel import (
    SPEC_ENV,
    Accept,
    Boot,
    Drain,
    Drained,
    Fatal,
    Heartbeat,
    MalformedMessage,
    PrimaryMessage,
    Ready,
    SpawnRequest,
    WorkerMessage,
    WorkerSpec,
    decode,
    encode,
    health_socket_name,
)
from .config import ConfigError, ServerConfig, Settings, read_env_file
from .events import EventBus
from .forkserver import ForkServerError, ForkServers
from .listeners import Listener
from .logs import OutputReader, WorkerLogs

HEARTBEAT_INTERVAL_MAX = 1.0
HEALTH_RETRY = 0.2  # seconds between health checks of a new worker
EXIT_UNLAUNCHED = 127  # reported for a worker whose process could not be started at all
EXIT_UNKNOWN = 255  # reported when the status cannot be collected (as asyncio does)


def heartbeat_interval(server: ServerConfig) -> float:
    """How often a worker reports: often enough that `timeout` spans at least four heartbeats."""
    return min(HEARTBEAT_INTERVAL_MAX, server.timeout / 4)


class Reports(Protocol):
    """What a worker process tells its supervisor, in the order it can happen."""

    def started(self, pid: int) -> None: ...  # the process exists

    def heard(self, heartbeat: Heartbeat | None) -> None: ...  # any message; a heartbeat has counters

    def fatal(self, error: str) -> None: ...  # it says why it cannot start

    def ready(self) -> None: ...  # healthy and accepting

    def unhealthy(self, reason: str) -> None: ...  # the health check failed until ready_timeout

    def drained(self) -> None: ...  # finished its requests after a drain; only the interpreter's exit is left

    def exited(self, code: int) -> None: ...  # gone (Popen's returncode convention: -N for signal N)


@dataclass(frozen=True)
class Launched:
    """A process that exists: its pid, our end of its channel, and the read ends of its stdout and stderr."""

    pid: int
    channel: socket.socket
    stdout: int
    stderr: int


class WorkerProcess:
    """One worker process. Made by `ProcessSpawner.spawn`; `pid` is None until the launch has made it."""

    def __init__(
        self,
        slot: int,
        reports: Reports,
        server: ServerConfig,
        logs: WorkerLogs,
        board: ConnectionBoard,
        board_index: int,
    ) -> None:
        self.slot = slot
        self.reports = reports
        self.server = server
        self.logs = logs
        self.board = board
        self.board_index = board_index
        self.pid: int | None = None
        self.health_problem: str | None = None  # the last failed health check, for a "not ready" message
        self.malformed = 0  # channel lines skipped because they were not a message
        self.gone = False
        self._pidfd: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._drain_asked = False
        self._opening = True  # until our end of the channel is open (or failed to)
        self._early_signal: signal.Signals | None = None  # asked for before the process existed
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ asked by the supervisor

    def drain(self) -> None:
        """Stop accepting, finish what it has, exit: over the channel, or SIGTERM when it has none."""
        self.board.set(self.board_index, balance.OFF)  # no one defers to a worker that has stopped accepting
        self._drain_asked = True  # sent as soon as the channel is open, if it is not yet
        if self._writer is not None and not self._writer.is_closing():
            self._send(Drain())
        elif not self._opening:  # its channel is gone: the signal is all it can hear
            self.signal(signal.SIGTERM)

    def signal(self, sig: signal.Signals) -> None:
        if self.gone:
            return
        if self._pidfd is None:
            # Not launched yet: the launch delivers it. SIGKILL outranks whatever was asked before.
            if self._early_signal != signal.SIGKILL:
                self._early_signal = sig
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    # ------------------------------------------------------------------ the launch

    def _send(self, message: PrimaryMessage) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    async def launch(self, start: Callable[[], Awaitable[Launched]], reap: Callable[[int], int]) -> None:
        """`start()` the process, then watch it; `reap(pid)` gives its exit status once the pidfd says it is gone."""
        try:
            launched = await start()
        except Exception as exc:  # whatever it was, the slot must learn that this worker will never run
            self.gone = True
            self.board.set(self.board_index, balance.OFF)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            self.reports.fatal(f"cannot start a worker process: {reason}")
            self.reports.exited(EXIT_UNLAUNCHED)
            return
        self.pid = launched.pid
        self._pidfd = os.pidfd_open(launched.pid)
        self.reports.started(launched.pid)
        pump_output(OutputReader(self.logs, self.slot, launched.pid, "out"), launched.stdout)
        pump_output(OutputReader(self.logs, self.slot, launched.pid, "err"), launched.stderr)
        self._watch_exit(reap)
        self._spawn_task(self._read_channel(launched.channel))
        if self._early_signal is not None:
            self.signal(self._early_signal)

    def _watch_exit(self, reap: Callable[[int], int]) -> None:
        loop = asyncio.get_running_loop()
        pidfd, pid = self._pidfd, self.pid
        assert pidfd is not None and pid is not None

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            code = reap(pid)
            self.gone = True
            self._pidfd = None
            os.close(pidfd)
            self.board.set(self.board_index, balance.OFF)
            # Whatever the worker forked dies with it: a grandchild must not keep the port (or run on).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self.reports.exited(code)

        loop.add_reader(pidfd, on_exit)

    # ------------------------------------------------------------------ the channel

    async def _read_channel(self, channel: socket.socket) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(sock=channel)
        except OSError:
            channel.close()
            self.signal(signal.SIGKILL)  # a worker we cannot hear is a worker we cannot supervise
            return
        finally:
            self._opening = False
        if self._drain_asked:
            self._send(Drain())
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the stream's limit: skipped like any other bad line
                    self.malformed += 1
                    continue
                if not line:
                    break
                try:
                    message = decode(line, WorkerMessage)
                except MalformedMessage:
                    self.malformed += 1
                    continue
                self._on_message(message)
        except (ConnectionError, OSError):
            pass
        finally:
            self._writer.close()

    def _on_message(self, message: WorkerMessage) -> None:
        self.reports.heard(message if isinstance(message, Heartbeat) else None)
        if isinstance(message, Boot):
            if self.server.health_path:
                self._spawn_task(self._health_check())
        elif isinstance(message, Ready):
            self.reports.ready()
        elif isinstance(message, Fatal):
            self.reports.fatal(message.error)
        elif isinstance(message, Drained):
            self.reports.drained()

    async def _health_check(self) -> None:
        """GET health_path on this very worker, over its private socket, until 2xx/3xx or the deadline."""
        loop = asyncio.get_running_loop()
        path = self.server.health_path
        assert self.pid is not None
        name = health_socket_name(os.getpid(), self.pid)
        deadline = loop.time() + self.server.ready_timeout
        while not self.gone and loop.time() < deadline:
            try:
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_unix_connection(name)
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                    status_line = await reader.readline()
                    writer.close()
                parts = status_line.split()
                code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                if 200 <= code < 400:
                    self._send(Accept())
                    return
                self.health_problem = f"health check failed: {path} answered {code or 'no HTTP status'}"
            except (OSError, TimeoutError) as exc:
                self.health_problem = f"health check failed: {path}: {exc or type(exc).__name__}"
            await asyncio.sleep(HEALTH_RETRY)
        if not self.gone:
            self.reports.unhealthy(self.health_problem or "health check failed")

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def pump_output(reader: OutputReader, fd: int) -> None:
    """Read a pipe on the loop as it fills, into `reader`, until its writers are all gone."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)

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
            os.close(fd)
            reader.close()

    loop.add_reader(fd, on_readable)


class ProcessSpawner:
    """Starts worker processes: forks of the generation's fork server, else fresh interpreters."""

    def __init__(self, settings: Settings, listener: Listener, events: EventBus, logs: WorkerLogs) -> None:
        self.settings = settings
        self.listener = listener
        self.logs = logs
        self.board = ConnectionBoard.create()
        self.forkservers = ForkServers(events, self._forkserver_env, self._pump_forkserver_output)
        self.sampler = ResourceSampler()
        self._live: set[WorkerProcess] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def configure(self, settings: Settings) -> None:
        self.settings = settings

    async def prepare(self, generation: int) -> None:
        """Have the generation's fork server up (its app imported, under preload_app) before its workers start."""
        app, server = self.settings.app, self.settings.server
        preload = (app.target, app.interface) if server.preload_app else None
        await self.forkservers.start(generation, preload, server.ready_timeout)

    def keep(self, generation: int) -> None:
        """Only this generation's workers will be started from now on: retire the other fork servers."""
        self.forkservers.keep(generation)

    def measure(self, pids: list[int]) -> dict[int, tuple[float, int]]:
        return self.sampler.measure(pids)

    async def close(self) -> None:
        await self.forkservers.close()
        self.board.close()

    def spawn(self, slot: int, generation: int, reports: Reports) -> WorkerProcess:
        self._live = {p for p in self._live if not p.gone}
        board_index = self.board.claim({p.board_index for p in self._live})
        process = WorkerProcess(slot, reports, self.settings.server, self.logs, self.board, board_index)
        self._live.add(process)
        task = asyncio.get_running_loop().create_task(self._launch(process, generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return process

    async def _launch(self, process: WorkerProcess, generation: int) -> None:
        env = self._worker_env(process.slot, generation)
        popens: dict[int, subprocess.Popen[bytes]] = {}

        async def fork(spec: WorkerSpec, fds: list[int]) -> int:
            assert forkserver is not None
            return await forkserver.fork(SpawnRequest(process.slot, spec, env), fds)

        async def popen(spec: WorkerSpec, fds: list[int]) -> int:
            *spec_fds, stdout, stderr = fds
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.worker"],
                pass_fds=spec_fds,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env={**env, SPEC_ENV: spec.to_json()},
                # Its own process group: Ctrl+C in the primary's terminal is the primary's to handle.
                process_group=0,
            )
            popens[proc.pid] = proc
            return proc.pid

        async def start() -> Launched:
            if forkserver is not None:
                # A failed fork gets no second try from the same descriptors: a child it may have made
                # before failing would share them. The pool replaces that fork server meanwhile.
                with contextlib.suppress(ForkServerError):
                    return await self._attempt(process, fork)
            return await self._attempt(process, popen)

        def reap(pid: int) -> int:
            proc = popens.pop(pid, None)
            if proc is not None:
                return proc.wait()
            # A fork server's worker is our child too (CLONE_PARENT): its status is ours to collect.
            try:
                return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            except ChildProcessError:
                return EXIT_UNKNOWN

        forkserver = await self.forkservers.get(generation)
        await process.launch(start, reap)

    async def _attempt(
        self, process: WorkerProcess, make: Callable[[WorkerSpec, list[int]], Awaitable[int]]
    ) -> Launched:
        """One try at starting the process: `make(spec, fds)` with a channel and pipes of its own."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            spec = self._spec(process, theirs.fileno())
            pid = await make(spec, [*spec.fds(), out_w, err_w])
        except BaseException:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        return Launched(pid, ours, out_r, err_r)

    def _spec(self, process: WorkerProcess, channel_fd: int) -> WorkerSpec:
        app, server = self.settings.app, self.settings.server
        return WorkerSpec(
            target=app.target,
            interface=app.interface,
            channel_fd=channel_fd,
            listen_fds=tuple(s.fileno() for s in self.listener.sockets_for_worker(process.slot)),
            board_fd=self.board.fd,
            board_index=process.board_index,
            heartbeat_interval=heartbeat_interval(server),
            keepalive_timeout=server.keepalive_timeout,
            header_timeout=server.header_timeout,
            graceful_timeout=server.graceful_timeout,
            forwarded_allow_ips=server.forwarded_allow_ips,
            access_log=server.access_log,
            accept_at_boot=not server.health_path,
        )

    def _app_env(self) -> dict[str, str]:
        """The environment the app sees: env_file under ours, with the CLUSTERCTL_ keys every worker shares."""
        server = self.settings.server
        app_env = dict(server.env_file_values)
        if server.env_file is not None:
            # Read at each spawn, so a reload picks up an edit without restarting the primary; one that
            # cannot be read any more (mid-deploy) must not leave the worker without its settings.
            try:
                app_env = read_env_file(server.env_file)
            except ConfigError as exc:
                print(f"clusterctl: env_file: {exc}; the worker gets the values read at start", file=sys.stderr)
        # The primary's own environment wins over the file, as with python-dotenv's load_dotenv().
        env = {**app_env, **os.environ}
        env.update(
            {
                "CLUSTERCTL_INSTANCE_TYPE": "worker",
                "CLUSTERCTL_PRIMARY_PID": str(os.getpid()),
                "CLUSTERCTL_DB": self.settings.store.db,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _worker_env(self, slot: int, generation: int) -> dict[str, str]:
        return {**self._app_env(), "CLUSTERCTL_WORKER_ID": str(slot), "CLUSTERCTL_GENERATION": str(generation)}

    def _forkserver_env(self, generation: int) -> dict[str, str]:
        # A preloaded app imports here: it sees what a worker sees, but for the slot, which only a fork has.
        return {**self._app_env(), "CLUSTERCTL_GENERATION": str(generation)}

    def _pump_forkserver_output(self, pid: int, out: int, err: int) -> None:
        # Slot 0: the fork server's lines (a preloaded app's import output among them) are clusterctl's own.
        pump_output(OutputReader(self.logs, 0, pid, "out"), out)
        pump_output(OutputReader(self.logs, 0, pid, "err"), err)


class ResourceSampler:
    """CPU and RSS of worker processes, with psutil (blocking: call it in a thread)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def measure(self, pids: list[int]) -> dict[int, tuple[float, int]]:
        out: dict[int, tuple[float, int]] = {}
        for gone in set(self._procs) - set(pids):
            del self._procs[gone]
        for pid in pids:
            try:
                proc = self._procs.get(pid)
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(None)
                with proc.oneshot():
                    out[pid] = (proc.cpu_percent(None), proc.memory_info().rss)
            except psutil.Error:
                continue
        return out
