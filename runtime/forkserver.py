"""The fork server: one single-threaded process per generation that forks workers on the primary's request.

A fresh interpreter spends about 100 ms importing uvicorn, uvloop and the app
before it serves. The primary never forks itself (it runs threads, and the
console), so it starts `python -m runtime.forkserver` for each generation of
the app: that process imports `runtime.worker` (uvicorn, uvloop, httptools)
and, with `[server] preload_app = true`, the app itself, then waits. For each
worker the primary sends a `SpawnRequest` (the slot, the `WorkerSpec`, the
environment) with the descriptors the worker needs (its channel, the
connection board, the listening sockets, its stdout and stderr pipes) as
SCM_RIGHTS; the fork server forks, and answers with the pid. A rolling
restart starts a new fork server, so the new generation runs the new code.

The child is cloned with CLONE_PARENT: it is the *primary's* child, a sibling
of the fork server, not the fork server's. So every promise of a worker holds
as for a fresh interpreter: the primary reaps it and learns its exit status;
its PR_SET_PDEATHSIG names the primary, so it dies with the primary (even
under SIGKILL); and a fork server that is retired, or killed, takes no worker
with it. The child also leads its own process group, takes its pipes as
stdout and stderr and the worker's environment, then runs `runtime.worker`.

If a fork server cannot start (the preloaded app fails to import, the
platform cannot clone) the generation's workers start as fresh interpreters,
and an event says so. One that dies is started again; one that keeps dying is
given up on the same way.

preload_app: what to know (gunicorn's `--preload` has the same hazards)
-----------------------------------------------------------------------
With preload the app is imported once, before any worker exists, and the
workers share its memory copy-on-write (`gc.freeze()` before each fork keeps
the collector from touching, and so copying, those pages). Code that runs at
import time runs in the fork server, not in a worker:

- threads started at import do not exist in the workers (fork copies only the
  forking thread); a lock such a thread held at the fork stays locked in the
  child. Start threads in the app's lifespan startup, or lazily;
- connections opened at import (a database pool, a Redis client, an httpx
  client with open sockets) are shared by every worker: their traffic
  interleaves. Open them in lifespan startup, or after the fork;
- random seeds and anything else initialised once are the same in every
  worker (Python's `random` is reseeded after a fork, other libraries may not
  be);
- `CLUSTERCTL_WORKER_ID` is not set at import (the fork server serves every
  slot): read it when handling a request or at lifespan startup;
- new code needs a `reload` (a new generation), as ever; a worker that
  crashes is replaced from its generation's fork server, with that
  generation's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .channel import (
    EXIT_BOOT_ERROR,
    SPEC_ENV,
    ForkServerHello,
    MalformedMessage,
    Spawned,
    SpawnFailed,
    SpawnRequest,
    decode,
    describe_exit,
    encode,
)

if TYPE_CHECKING:
    from .events import EventBus

MAX_PACKET = 1 << 20  # a request: the spec and the worker's environment
MAX_FDS = 64
FORK_TIMEOUT = 5.0  # seconds for one fork's answer; then that fork server counts as dead
RETIRE_GRACE = 2.0  # seconds a retired fork server gets to exit at the end of the primary
DEATHS_TOLERATED = 3  # deaths of one generation's fork server within DEATH_WINDOW before giving up on it
DEATH_WINDOW = 60.0

# Room in the fork server's environment block for what a worker's has more (its slot, its spec).
ENV_ROOM = "CLUSTERCTL_FORKSERVER_ENV_ROOM"
ENV_ROOM_BYTES = 4096
_CLONE_PARENT = 0x00008000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)


class ForkServerError(Exception):
    """A fork server could not start or could not fork; the message says why."""


# ---------------------------------------------------------------- the fork server process


def fork_sibling() -> int:
    """fork(), but the child's parent is our parent (CLONE_PARENT). 0 in the child, its pid here; OSError.

    Python's own fork hooks run around it as for `os.fork()` (the import lock, `random`'s reseed,
    `threading`'s bookkeeping). The clone is made through PyDLL, which keeps the GIL: no other thread
    of ours (a preloaded app may start some) runs Python code across it.
    """
    if _SYS_CLONE is None:
        raise OSError(errno.ENOSYS, f"no clone system call number known for {os.uname().machine}")
    libc = ctypes.PyDLL(None, use_errno=True)
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    flags = _CLONE_PARENT | signal.SIGCHLD
    pid = libc.syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_long(flags), *[ctypes.c_long(0)] * 4)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    error = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(error, os.strerror(error))
    return pid


def main() -> None:
    from . import worker  # the reason this process exists: every worker's imports, made once

    worker.die_with_primary(int(os.environ["CLUSTERCTL_PRIMARY_PID"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl+C is the primary's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=int(sys.argv[1]))
    worker.warm_up()
    loaded = None
    error = None
    if _SYS_CLONE is None:
        error = f"cannot fork workers on {os.uname().machine} (no clone system call number known)"
    elif len(sys.argv) == 4:
        try:
            loaded = worker.load_app(sys.argv[2], sys.argv[3])
        except worker.AppLoadError as exc:
            error = str(exc)
    channel.send(encode(ForkServerHello(os.getpid(), loaded is not None, error)))
    if error is not None:
        sys.exit(EXIT_BOOT_ERROR)
    sys.exit(_serve(channel, loaded))


def _serve(channel: socket.socket, loaded: tuple[Any, str] | None) -> int:
    """Fork a worker per request until the primary closes the channel. In a child: the worker's exit status."""
    while True:
        data, fds, _flags, _address = socket.recv_fds(channel, MAX_PACKET, MAX_FDS)
        if not data:
            return 0  # retired, or the primary is gone
        try:
            request = decode(data, SpawnRequest)
            if len(fds) != len(request.spec.fds()) + 2:
                raise MalformedMessage(f"expected {len(request.spec.fds()) + 2} descriptors, got {len(fds)}")
            pid = _fork()
        except (MalformedMessage, OSError) as exc:
            for fd in fds:
                os.close(fd)
            channel.send(encode(SpawnFailed(str(exc))))
            continue
        if pid == 0:
            return _become_worker(channel, request, fds, loaded)
        for fd in fds:
            os.close(fd)
        channel.send(encode(Spawned(pid)))


def _fork() -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child writes our unflushed output again
    # Everything imported so far (uvicorn and the rest, and the app under preload_app) goes to the
    # permanent generation: the collector never walks it in a worker, so its pages stay shared.
    gc.freeze()
    return fork_sibling()


def _become_worker(
    channel: socket.socket, request: SpawnRequest, fds: list[int], loaded: tuple[Any, str] | None
) -> int:
    from . import worker

    os.setpgid(0, 0)  # its own group, as a fresh worker has: the primary ends the group with the worker
    channel.close()  # only the fork server talks to the primary on it; a copy here would hide its exit
    *spec_fds, out, err = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    spec = request.spec.with_fds(spec_fds)
    # The same environment as a fresh interpreter's, spec included: an app cannot tell how it was started.
    env = {**request.env, SPEC_ENV: spec.to_json()}
    os.environ.clear()
    os.environ.update(env)
    _show_environment(env)
    worker.become_worker()
    return worker.serve(spec, loaded)


def _show_environment(env: dict[str, str]) -> None:
    """Have /proc/self/environ (`ps e`, psutil) show `env` rather than the fork server's.

    The kernel shows the block the environment had at exec, wherever libc's copy went since. Once
    `os.environ` has been replaced (so libc no longer points into that block), the block is ours to
    overwrite, as setproctitle does with argv. The fork server starts with `ENV_ROOM` in its
    environment, so a worker's few more keys fit; if they do not, the block stays as it was.
    """
    stat = open("/proc/self/stat", "rb").read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    start, end = int(fields[47]), int(fields[48])  # env_start and env_end: fields 50 and 51 of proc(5)
    block = b"".join(f"{key}={value}".encode() + b"\0" for key, value in env.items())
    if start and len(block) < end - start:
        ctypes.memmove(start, block.ljust(end - start, b"\0"), end - start)


# ---------------------------------------------------------------- the primary's side


class ForkServer:
    """One fork server process, from the primary: start it, ask it for workers, retire it."""

    def __init__(self, generation: int, proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
        self.generation = generation
        self.proc = proc
        self.pid = proc.pid
        self.serving = False  # it said hello: from now on its death is news
        self.retired = False
        self.failure: str | None = None  # why we killed it
        self._channel = channel
        # One conversation at a time: answers come in order, one per request. The channel is closed
        # only outside one, once the process is gone: never under a read the loop still waits on.
        self._lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self.exited.set_result(proc.wait())
            if not self._lock.locked():
                self._channel.close()

        loop.add_reader(pidfd, on_exit)

    @classmethod
    def launch(
        cls,
        generation: int,
        env: dict[str, str],
        preload: tuple[str, str] | None,
        output: Callable[[int, int, int], None],
    ) -> ForkServer:
        """Start the process; `output(pid, stdout, stderr)` gets the read ends of its pipes. ForkServerError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        argv = [sys.executable, "-m", "runtime.forkserver", str(theirs.fileno()), *(preload or ())]
        try:
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env={**env, "PYTHONUNBUFFERED": "1", ENV_ROOM: "." * ENV_ROOM_BYTES},
                process_group=0,  # the terminal's Ctrl+C is the primary's to handle
            )
        except OSError as exc:
            ours.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise ForkServerError(f"cannot start it: {exc.strerror or exc}") from None
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        output(proc.pid, out_r, err_r)
        ours.setblocking(False)
        return cls(generation, proc, ours)

    @property
    def alive(self) -> bool:
        return not self.exited.done() and self.failure is None and not self.retired

    async def hello(self, timeout: float) -> ForkServerHello:
        """Wait until it has imported what it preloads; ForkServerError if it cannot serve."""
        async with self._conversation():
            try:
                async with asyncio.timeout(timeout):
                    data = await asyncio.get_running_loop().sock_recv(self._channel, MAX_PACKET)
                hello = decode(data, ForkServerHello) if data else None
            except (OSError, TimeoutError, MalformedMessage) as exc:
                self.kill(f"no hello within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc))
                raise ForkServerError(self.failure) from None
        if hello is None:
            raise ForkServerError(f"it exited during start-up ({describe_exit(await self.exited)})")
        if hello.error is not None:
            self.kill(hello.error)
            raise ForkServerError(hello.error)
        self.serving = True
        return hello

    async def fork(self, request: SpawnRequest, fds: list[int]) -> int:
        """A new worker's pid. ForkServerError (and this fork server is killed) if it cannot give one."""
        async with self._conversation():
            if not self.alive:
                raise ForkServerError(self.failure or "it has exited")
            try:
                socket.send_fds(self._channel, [encode(request)], fds)
                async with asyncio.timeout(FORK_TIMEOUT):
                    data = await asyncio.get_running_loop().sock_recv(self._channel, MAX_PACKET)
                reply = decode(data, Spawned | SpawnFailed) if data else SpawnFailed("it closed its channel")
            except (OSError, TimeoutError, MalformedMessage) as exc:
                reply = SpawnFailed(f"{type(exc).__name__}: {exc}")
            except asyncio.CancelledError:
                self.kill("a fork request was interrupted")  # its answer would be read as the next one's
                raise
            if isinstance(reply, SpawnFailed):
                self.kill(f"fork failed: {reply.error}")
                raise ForkServerError(reply.error)
            return reply.pid

    @contextlib.asynccontextmanager
    async def _conversation(self) -> AsyncIterator[None]:
        async with self._lock:
            try:
                yield
            finally:
                if self.exited.done():
                    self._channel.close()

    def retire(self) -> None:
        """No more workers from this one: it exits when it reads the end of its channel."""
        self.retired = True
        with contextlib.suppress(OSError):  # already gone
            self._channel.shutdown(socket.SHUT_RDWR)

    def kill(self, reason: str) -> None:
        self.failure = self.failure or reason
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class ForkServers:
    """The fork servers of the generations in use, started on demand and replaced when they die."""

    def __init__(
        self,
        events: EventBus,
        env: Callable[[int], dict[str, str]],
        output: Callable[[int, int, int], None],
    ) -> None:
        self.events = events
        self._env = env  # the environment of a generation's fork server
        self._output = output
        self._plans: dict[int, tuple[tuple[str, str] | None, float]] = {}  # generation → (preload, start timeout)
        self._servers: dict[int, ForkServer] = {}
        self._starting: dict[int, asyncio.Task[ForkServer | None]] = {}
        self._given_up: set[int] = set()
        self._deaths: dict[int, list[float]] = {}
        self._all: set[ForkServer] = set()
        self._closing = False

    async def start(self, generation: int, preload: tuple[str, str] | None, timeout: float) -> None:
        """Start the generation's fork server (`preload`: the app's target and interface) and wait for it."""
        self._plans[generation] = (preload, timeout)
        self._given_up.discard(generation)
        await self.get(generation)

    async def get(self, generation: int) -> ForkServer | None:
        """The generation's fork server, started again if it died; None: start its workers as fresh interpreters."""
        server = self._servers.get(generation)
        if server is not None and server.alive:
            return server
        if self._closing or generation not in self._plans or generation in self._given_up:
            return None
        task = self._starting.get(generation)
        if task is None:
            task = self._starting[generation] = asyncio.get_running_loop().create_task(self._start(generation))
            task.add_done_callback(lambda _: self._starting.pop(generation, None))
        return await asyncio.shield(task)

    def keep(self, generation: int) -> None:
        """Retire every other generation's fork server (their workers live on: they are not its children)."""
        for other in [g for g in self._plans if g != generation]:
            del self._plans[other]
            self._given_up.discard(other)
            self._deaths.pop(other, None)
            task = self._starting.pop(other, None)
            if task is not None:
                task.cancel()
            server = self._servers.pop(other, None)
            if server is not None:
                server.retire()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._starting.values()):
            task.cancel()
        for server in self._all:
            server.retire()
        pending = [s.exited for s in self._all if not s.exited.done()]
        if pending:
            await asyncio.wait(pending, timeout=RETIRE_GRACE)
        for server in self._all:
            server.kill("still running at shutdown")

    async def _start(self, generation: int) -> ForkServer | None:
        preload, timeout = self._plans[generation]
        server = None
        try:
            server = ForkServer.launch(generation, self._env(generation), preload, self._output)
            self._all.add(server)
            server.exited.add_done_callback(lambda f, s=server: self._on_exit(s, f.result()))
            hello = await server.hello(timeout)
        except ForkServerError as exc:
            self._give_up(generation, f"it cannot start: {exc}")
            return None
        except asyncio.CancelledError:
            if server is not None:
                server.kill("retired while starting")
            raise
        self._servers[generation] = server
        preloaded = ", app preloaded" if hello.preloaded else ""
        self.events.publish(
            "forkserver.started",
            f"fork server of generation {generation} ready (pid {server.pid}{preloaded})",
            pid=server.pid,
            generation=generation,
        )
        return server

    def _on_exit(self, server: ForkServer, code: int) -> None:
        self._all.discard(server)
        if self._servers.get(server.generation) is server:
            del self._servers[server.generation]
        generation = server.generation
        if server.retired or self._closing or generation not in self._plans or generation in self._given_up:
            return
        if not server.serving:
            return  # _start has said why it never served
        how = server.failure or describe_exit(code)
        now = time.monotonic()
        deaths = [t for t in self._deaths.get(generation, []) if now - t < DEATH_WINDOW] + [now]
        self._deaths[generation] = deaths
        if len(deaths) > DEATHS_TOLERATED:
            self._give_up(generation, f"it died {len(deaths)} times in {DEATH_WINDOW:g}s, last: {how}")
            return
        self.events.publish(
            "forkserver.died",
            f"fork server of generation {generation} (pid {server.pid}) died ({how}); its workers serve on,"
            " and a new one starts",
            pid=server.pid,
            generation=generation,
        )
        task = asyncio.get_running_loop().create_task(self.get(generation))
        task.add_done_callback(_consume)

    def _give_up(self, generation: int, why: str) -> None:
        self._given_up.add(generation)
        self.events.publish(
            "forkserver.unavailable",
            f"no fork server for generation {generation} ({why}): its workers start as fresh interpreters",
            generation=generation,
        )


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


if __name__ == "__main__":
    main()
