"""The worker: `python -m runtime.worker` (a fresh interpreter), or `serve()` in a fork server's child.

A worker gets the listening socket(s) and one end of a private channel (a unix
socketpair) from the primary, imports the app (unless its fork server already
has), and serves it with uvicorn's httptools protocol on a uvloop loop. It
does its own accepting (`Acceptor`) so that stopping can never strand a
connection that was accepted but not yet handed to the protocol (cpython
#109564), and so that it can step aside for a less loaded worker (`runtime.balance`).
uvloop sets TCP_NODELAY on every TCP transport it opens; `runtime.coalesce`
sends a response's head and body in one write.

The channel's messages are the typed ones of `runtime.channel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import faulthandler
import functools
import importlib
import inspect
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from email.utils import formatdate
from time import perf_counter
from typing import Any

import uvicorn
import uvloop
from uvicorn.logging import AccessFormatter
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState

from . import balance
from .balance import ConnectionBoard
from .channel import (
    BACKLOG,
    EXIT_BOOT_ERROR,
    EXIT_PRIMARY_GONE,
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
    WorkerMessage,
    WorkerSpec,
    decode,
    encode,
    health_socket_name,
)
from .coalesce import CoalescingTransport
from .metrics import RequestCounters

_PR_SET_PDEATHSIG = 1

# accept() that fails for want of a resource fails again at once, and the listener stays readable:
# stop reading it for a while (other workers take the connections meanwhile) instead of spinning.
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 1.0
# A drain cancels app tasks left running this long after their last connection closed.
ORPHAN_GRACE = 1.0
# Lifespan shutdown gets at least this long, even after graceful_timeout ran out on a slow request
# (the primary's SIGKILL comes 2 s after the deadline).
LIFESPAN_GRACE = 1.5
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AppLoadError(Exception):
    pass


def load_app(target: str, interface: str) -> tuple[Any, str]:
    """Import MODULE:ATTR and return (an ASGI 3 callable, the interface it was detected as)."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # the app may sys.exit() or raise anything at import time
        traceback.print_exc()
        raise AppLoadError(f"cannot import app {target!r}: {type(exc).__name__}: {exc}") from None
    app: Any = module
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"cannot load app {target!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(app):
        raise AppLoadError(f"cannot load app {target!r}: {type(app).__name__} object is not callable")
    kind = detect_interface(app) if interface == "auto" else interface
    if kind == "wsgi":
        return WSGIAdapter(app), "wsgi"
    if kind == "asgi2":
        from uvicorn.middleware.asgi2 import ASGI2Middleware

        return ASGI2Middleware(app), "asgi2"
    return app, "asgi3"


def detect_interface(app: Any) -> str:
    """asgi3 for an async callable, wsgi for a sync one taking (environ, start_response)."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)  # noqa: B004
    if inspect.iscoroutinefunction(call):
        return "asgi3"
    if inspect.isclass(app):
        return "asgi2"
    try:
        params = [
            p
            for p in inspect.signature(call).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return "asgi3"
    if len(params) == 2:
        return "wsgi"
    if len(params) == 1:
        return "asgi2"
    return "asgi3"


class WSGIAdapter:
    """A WSGI app served through a2wsgi, whose `wsgi.input` ends exactly where the request body ends.

    a2wsgi's input reads until the last body message, chunked or not, so the environ says so with
    `wsgi.input_terminated`; without it Werkzeug (Flask) reads a body that has no Content-Length
    as empty. An app told to trust EOF must not get one early: a2wsgi would read the
    `http.disconnect` of a client that went away mid-body as the end of it, so that is an error.
    """

    def __init__(self, app: Any) -> None:
        from a2wsgi import WSGIMiddleware

        def terminated(environ: dict[str, Any], start_response: Any) -> Any:
            environ["wsgi.input_terminated"] = True
            return app(environ, start_response)

        self.middleware = WSGIMiddleware(terminated)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def receive_body() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect":  # a2wsgi asks only while the body is unfinished
                raise ConnectionResetError("the client disconnected before the end of the request body")
            return message

        await self.middleware(scope, receive_body, send)


class MetricsMiddleware:
    """Every request's one wrapper: proxy headers, counters and timing, `Connection: close` while draining.

    It runs on every request, so it is one coroutine frame and one closure per request: proxy
    headers are applied inline (`Forwarded`) rather than by two more middleware layers.
    """

    def __init__(self, app: Any, counters: RequestCounters, worker: Worker, forwarded: Forwarded | None = None) -> None:
        self.app = app
        self.counters = counters
        self.worker = worker
        self.forwarded = forwarded

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if self.forwarded is not None and kind != "lifespan":
            self.forwarded.apply(scope)
        if kind != "http":
            await self.app(scope, receive, send)
            return
        counters = self.counters
        worker = self.worker
        status = 0

        def watch(message: dict[str, Any]) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if worker.draining:
                    # The client learns this connection is ending with this response, so it
                    # never sends its next request into a socket we are about to close.
                    message = dict(message)
                    message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            return send(message)

        counters.in_flight += 1
        started = perf_counter()
        try:
            await self.app(scope, receive, watch)
        except BaseException:
            status = status or 500
            raise
        finally:
            counters.in_flight -= 1
            counters.record(status, perf_counter() - started)


class Forwarded:
    """X-Forwarded-For and -Proto from a trusted proxy, by uvicorn's rules, with a unix-socket peer trusted too.

    Which peers and hops are trusted is uvicorn's `forwarded_allow_ips` logic (its
    `ProxyHeadersMiddleware.trusted_hosts`): a proxy's X-Forwarded-For is read from the right
    and the first hop that is not itself trusted is the client, so a client cannot pick its own
    address through a proxy that appends to the header. A unix socket's peer has no address
    (`scope["client"]` is None) and uvicorn would ignore its headers unless told to trust anyone;
    but only a process on this host that the socket file's mode (`socket_mode`) lets in can connect
    there, the proxy, so it is trusted, as gunicorn trusts a unix-socket peer.
    """

    SCHEMES = frozenset((b"http", b"https", b"ws", b"wss"))

    def __init__(self, trusted: list[str] | str) -> None:
        hosts = [host.strip() for host in trusted.split(",")] if isinstance(trusted, str) else list(trusted)
        self.trusted = ProxyHeadersMiddleware(_nothing, hosts).trusted_hosts

    def apply(self, scope: dict[str, Any]) -> None:
        client = scope.get("client")
        if client is None:
            # Addressless on a unix socket, whose local "address" is a path with no port. Not a TCP peer
            # that reset before uvicorn read its address: that one has no address, but its server has a port.
            server = scope.get("server")
            if server is not None and server[1] is not None:
                return
        elif client[0] not in self.trusted:
            return
        proto = None
        hops: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-for":
                hops.append(value)
        if proto is not None:
            proto = proto.strip()
            if proto in self.SCHEMES:
                scheme = proto.decode("latin1")
                scope["scheme"] = scheme.replace("http", "ws") if scope["type"] == "websocket" else scheme
        if hops:
            host, port = self.trusted.get_trusted_client_address(b", ".join(hops).decode("latin1"))
            if host:  # an empty header names no one: keep the peer
                scope["client"] = (host, port)


class Acceptor:
    """Accepts on the inherited listening sockets and hands each connection to uvicorn's protocol.

    While connections last (keep-alive clients, a proxy's pool), it accepts in
    Python: one accept per readiness wake-up, and none while this worker holds
    more connections than the least loaded one (see `runtime.balance`), so
    every worker woken on the shared socket gets a fair chance at the next
    connection. Out of file descriptors, it stops accepting for a back-off
    instead of spinning on the failure.

    Connections that do not last (`balance.CHURN`) are not worth placing, so it
    never steps aside for them; and while many arrive (a new connection per
    request, `balance.CHURN_RATE`), each would cost the Python accept path
    about a tenth of its whole CPU: uvloop's own server accepts instead, in C,
    on a duplicate of the listening descriptor (closing it leaves the shared
    socket open), until that stops. Either way a connection gets
    `header_timeout` seconds to send its request head.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol: Callable[..., asyncio.Protocol],
        connections: Callable[[], int],
        board: ConnectionBoard | None = None,
        index: int = 0,
        header_timeout: float = 10.0,
    ) -> None:
        self.sockets = sockets
        self.connections = connections
        self.board = board
        self.index = index
        self.pending: set[asyncio.Task[Any]] = set()
        self.accepting = False
        self.loop = asyncio.get_running_loop()  # looked up once: each lookup costs a getpid() system call
        self._deferred_since: float | None = None
        self.lifetime = math.inf  # running average of its connections' lifetimes, seconds (none closed yet)
        self.made = 0  # connections made so far (counted in the protocol, whoever accepted them)
        self._made_before = 0  # ... at the last look at the accept rate
        self._looking: asyncio.TimerHandle | None = None
        self.churning = False  # many connections a second that do not last (see `_look`)
        # The listeners it is stepping aside on (not reading) for now, with the timer that ends that.
        self._aside: dict[int, asyncio.TimerHandle] = {}
        self._backoff = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._failures = 0  # accepts failed since the last one that worked
        self._failing_since = 0.0
        self.factory = _guarded(protocol, self, header_timeout)
        self._listeners = {sock.fileno(): sock for sock in sockets}
        self._accepted = {fd: _accepted_sockets(sock) for fd, sock in self._listeners.items()}
        # Listeners served by uvloop's own server for now (connections do not last): fd → its server,
        # or the task still creating it.
        self._native: dict[int, asyncio.Task[asyncio.AbstractServer]] = {}

    def publish(self) -> None:
        if self.board is not None and self.accepting:
            self.board.set(self.index, self.connections() + len(self.pending))

    def connection_ended(self, lifetime: float) -> None:
        """One of its connections closed after `lifetime` seconds: it may now be the least loaded."""
        if self.lifetime == math.inf:
            self.lifetime = lifetime
        else:
            self.lifetime += (lifetime - self.lifetime) * balance.LIFETIME_WEIGHT
        self.publish()
        for fd, timer in list(self._aside.items()):
            timer.cancel()
            self._resume(self._listeners[fd])

    def start(self) -> None:
        if self.accepting:
            return
        loop = self.loop
        for sock in self.sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)
        self.accepting = True
        self.publish()
        self._looking = loop.call_later(balance.LOOK_EVERY, self._look)

    def _look(self) -> None:
        """Once a second: many connections a second that do not last → uvloop's server; else the Python path."""
        rate = (self.made - self._made_before) / balance.LOOK_EVERY
        self._made_before = self.made
        self.churning = rate >= balance.CHURN_RATE and self.lifetime < balance.CHURN
        if self.churning and not self._native and self._backoff_timer is None:
            for listener in self.sockets:
                self._accept_natively(listener)
        elif not self.churning and self._native:
            self._accept_in_python()
        if self.accepting:
            self._looking = self.loop.call_later(balance.LOOK_EVERY, self._look)

    def _accept(self, listener: socket.socket) -> None:
        loop = self.loop
        if self.board is not None and not self.churning and self._step_aside(loop.time()):
            loop.remove_reader(listener.fileno())
            self._aside[listener.fileno()] = loop.call_later(balance.DEFER, self._resume, listener)
            self.publish()
            return
        try:
            # socket.accept() asks the new socket's family and type back as enums, three times
            # over with uvloop's questions: a tenth of the accept path. Known from the listener.
            fd, _ = listener._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._back_off(loop, exc)
            else:  # an error about that one connection, which the failed accept used up
                print(f"accept failed: {exc}", file=sys.stderr)
            return
        if self._failures:
            took = loop.time() - self._failing_since
            print(f"accepting again after {self._failures} failed accepts in {took:.1f}s", file=sys.stderr)
            self._failures = 0
            self._backoff = 0.0
        task = loop.create_task(loop.connect_accepted_socket(self.factory, self._accepted[listener.fileno()](fd)))
        self.pending.add(task)
        task.add_done_callback(self._connected)
        self.publish()

    def _accept_natively(self, listener: socket.socket) -> None:
        fd = listener.fileno()
        try:
            duplicate = listener.dup()
        except OSError as exc:  # out of descriptors: the Python accept path has the back-off for that
            self._back_off(self.loop, exc)
            return
        self.loop.remove_reader(fd)
        if listener.family == socket.AF_UNIX:
            server = self.loop.create_unix_server(self.factory, sock=duplicate, backlog=BACKLOG)
        else:
            server = self.loop.create_server(self.factory, sock=duplicate, backlog=BACKLOG)
        creating = self._native[fd] = self.loop.create_task(server)

        def started(task: asyncio.Task[asyncio.AbstractServer]) -> None:
            error = "cancelled" if task.cancelled() else task.exception()
            if error is not None and self._native.get(fd) is task:
                del self._native[fd]  # it could not start: accept in Python, as before
                print(f"accepting with uvloop's server failed: {error!r}", file=sys.stderr)
                duplicate.close()
                if self.accepting and self._backoff_timer is None:
                    self.loop.add_reader(fd, self._accept, listener)

        creating.add_done_callback(started)

    def _accept_in_python(self) -> None:
        for fd, creating in self._native.items():
            _close_server(creating)
            if self.accepting and self._backoff_timer is None:
                self.loop.add_reader(fd, self._accept, self._listeners[fd])
        self._native.clear()

    def _back_off(self, loop: asyncio.AbstractEventLoop, exc: OSError) -> None:
        """Stop reading every listener (the shortage is the process's) for a pause that doubles up to the cap.

        One line when the shortage starts and one with the count when it ends: a worker out of
        fds for minutes must not flood the primary's log with a line per wake-up.
        """
        if not self._failures:
            self._failing_since = loop.time()
            print(
                f"accept failed: {exc}; pausing accepts ({ACCEPT_BACKOFF_MIN:g}s doubling to "
                f"{ACCEPT_BACKOFF_MAX:g}s) until one succeeds",
                file=sys.stderr,
            )
        self._failures += 1
        self._backoff = min(ACCEPT_BACKOFF_MAX, self._backoff * 2 or ACCEPT_BACKOFF_MIN)
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
        self._backoff_timer = loop.call_later(self._backoff, self._end_pause)

    def _end_pause(self) -> None:
        self._backoff_timer = None
        if self.accepting:
            loop = self.loop
            for sock in self.sockets:
                if sock.fileno() not in self._native:
                    loop.add_reader(sock.fileno(), self._accept, sock)

    def _step_aside(self, now: float) -> bool:
        assert self.board is not None
        since = self._deferred_since
        if since is not None and now - since > balance.MAX_DEFER * 5:
            since = None  # left over from an earlier connection
        if since is not None and now - since >= balance.MAX_DEFER:
            self._deferred_since = None
            return False  # waited long enough: the least loaded worker may be busy or stuck
        if self.board.should_defer(self.index, self.connections() + len(self.pending)):
            self._deferred_since = since if since is not None else now
            return True
        self._deferred_since = None
        return False

    def _resume(self, listener: socket.socket) -> None:
        if self._aside.pop(listener.fileno(), None) is None:
            return  # resumed already
        if self.accepting and self._backoff_timer is None and listener.fileno() not in self._native:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self.pending.discard(task)
        self.publish()

    async def stop(self) -> None:
        """Stop accepting; every connection already accepted is handed over before this returns."""
        loop = self.loop
        if self.accepting:
            for sock in self.sockets:
                loop.remove_reader(sock.fileno())
        self.accepting = False
        if self._looking is not None:
            self._looking.cancel()
        if self._native:
            servers = list(self._native.values())
            self._native.clear()
            await asyncio.gather(*servers, return_exceptions=True)
            for creating in servers:
                _close_server(creating)
            await asyncio.sleep(0)  # what uvloop accepted last meets its protocol (connection_made) now
        if self.board is not None:
            self.board.set(self.index, balance.OFF)
        for sock in self.sockets:
            sock.close()
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


def _close_server(creating: asyncio.Task[asyncio.AbstractServer]) -> None:
    """Close a server started on a duplicate listener (its duplicate with it), made or still being made."""
    if not creating.done():
        creating.add_done_callback(_close_server)
    elif not creating.cancelled() and creating.exception() is None:
        creating.result().close()


def _accepted_sockets(listener: socket.socket) -> Callable[[int], socket.socket]:
    """fd → a socket object for a connection accepted on `listener`, its family and type known, not asked."""
    family, kind = listener.family, listener.type

    class Accepted(socket.socket):
        __slots__ = ()

    Accepted.family = family  # type: ignore[misc, assignment]  # plain class attributes, not properties
    Accepted.type = kind  # type: ignore[misc, assignment]
    return functools.partial(Accepted, family, kind, 0)


def _guarded(protocol: Callable[..., asyncio.Protocol], acceptor: Acceptor, header_timeout: float) -> Any:
    """uvicorn's HTTP protocol (a class, or a partial of one) with what every accepted connection gets.

    A header deadline, writes coalesced (`runtime.coalesce`), and the connection board kept
    current when the connection ends. A subclass made once, not closures set on each protocol:
    those would make every connection a reference cycle, left to the garbage collector.
    """
    base, kwargs = (protocol.func, protocol.keywords) if isinstance(protocol, functools.partial) else (protocol, {})
    loop = acceptor.loop

    class Guarded(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._opened = loop.time()
            acceptor.made += 1
            self._header_deadline = loop.call_later(header_timeout, _close_if_no_request, self)
            super().connection_made(CoalescingTransport(transport, loop))  # type: ignore[arg-type]

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)
            acceptor.connection_ended(loop.time() - self._opened)

    return functools.partial(Guarded, **kwargs)


def _close_if_no_request(protocol: Any) -> None:
    """The header timeout: close a connection that has not sent a whole request head yet.

    Not one that has (uvicorn's keep-alive timeout and the drain look after those), nor one
    upgraded to a WebSocket, whose transport now belongs to the WebSocket protocol.
    """
    transport = protocol.transport
    if transport is None or transport.is_closing() or transport.get_protocol() is not protocol:
        return
    if protocol.cycle is None:
        transport.close()


class Worker:
    def __init__(
        self,
        app: Any,
        interface: str,
        spec: WorkerSpec,
        channel: socket.socket,
        listeners: dict[int, tuple[int, int]],
    ) -> None:
        self.spec = spec
        self.interface = interface
        self.channel_sock = channel
        self.listener_ids = listeners
        self.http_protocol: type[asyncio.Protocol] | None = None
        self.counters = RequestCounters()
        self.app = MetricsMiddleware(app, self.counters, self)
        self.state = ServerState()
        self.acceptor: Acceptor | None = None
        self.draining = False
        self.done = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def send(self, message: WorkerMessage) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(sock=self.channel_sock)
        self._spawn(self._heartbeat())
        self._spawn(self._listen(reader))
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain)

        if self.spec.access_log:
            _log_access_to_stdout()
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            # As uvicorn's own command sets it. Unset, uvicorn's protocol takes it for TRACE and
            # formats a "connection made/lost" record for every connection, only for it to be dropped.
            uvicorn_log.setLevel(logging.INFO)
        config = uvicorn.Config(
            app=self.app,
            interface="asgi3",
            http="httptools",
            lifespan="off" if self.interface == "wsgi" else "auto",
            access_log=self.spec.access_log,
            log_config=None,
            timeout_keep_alive=self.spec.keepalive_timeout,
            # Applied by our middleware (Forwarded), which also trusts the proxy on a unix: bind.
            proxy_headers=False,
            # None (the key not in the config) leaves uvicorn's default: FORWARDED_ALLOW_IPS, else loopback.
            forwarded_allow_ips=_allow_ips(self.spec.forwarded_allow_ips),
        )
        config.load()
        self.app.forwarded = Forwarded(config.forwarded_allow_ips)
        self._spawn(self._date_header(config.encoded_headers))
        self.lifespan = config.lifespan_class(config)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.send(Fatal(f"app {self.spec.target!r}: lifespan startup failed"))
            await self._flush()
            return EXIT_BOOT_ERROR
        problem = _changed_listener(self.listener_ids)
        if problem is not None:
            self.send(Fatal(problem))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.lifespan.shutdown(), timeout=self.spec.graceful_timeout)
            await self._flush()
            return EXIT_BOOT_ERROR
        self.http_protocol = config.http_protocol_class
        factory = functools.partial(
            config.http_protocol_class,
            config=config,
            server_state=self.state,
            app_state=self.lifespan.state,
        )
        listeners = [socket.socket(fileno=fd) for fd in self.spec.listen_fds]
        self.acceptor = Acceptor(
            listeners,
            factory,
            lambda: len(self.state.connections),
            ConnectionBoard(self.spec.board_fd),
            self.spec.board_index,
            # A new connection that has not sent a whole request head by then is closed: otherwise
            # idle or trickling clients hold an fd each for ever (uvicorn times out a connection only
            # between requests). Not keepalive_timeout: operators raise that above a load balancer's
            # idle timeout, and that must not lift this guard too.
            self.spec.header_timeout,
        )
        health = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        health.bind(health_socket_name(int(os.environ["CLUSTERCTL_PRIMARY_PID"]), os.getpid()))
        health.listen(16)
        health.setblocking(False)
        self.health_server = await loop.create_unix_server(factory, sock=health)
        self.send(Boot(self.interface))
        if self.spec.accept_at_boot:
            self._accept()
        await self.done.wait()
        return 0

    def _accept(self) -> None:
        if not self.draining and self.acceptor is not None:
            self.acceptor.start()
            self.send(Ready())

    def begin_drain(self) -> None:
        if self.acceptor is None:
            os._exit(0)  # told to stop before it ever served: nothing to drain
        if not self.draining:
            self.draining = True
            self._spawn(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.acceptor is not None
        await self.acceptor.stop()
        self.health_server.close()
        deadline = loop.time() + self.spec.graceful_timeout
        idle_cutoff = loop.time() + self.spec.keepalive_timeout + 0.5
        orphaned_since: float | None = None
        while self.state.connections or self.state.tasks:
            now = loop.time()
            if now >= deadline:
                break
            if self.state.connections:
                orphaned_since = None
            elif orphaned_since is None:
                orphaned_since = now
            elif now - orphaned_since > ORPHAN_GRACE:
                # Every connection is gone, yet app tasks run on: a WebSocket handler that never
                # reads (a broadcast loop) or a stream whose client left. No one awaits them.
                logging.getLogger("uvicorn.error").addFilter(_not_cancelled)
                for task in list(self.state.tasks):
                    task.cancel()
            for conn in list(self.state.connections):
                if not isinstance(conn, self.http_protocol):
                    # A WebSocket has no request boundary to wait for: close it now with 1012
                    # (service restart), as uvicorn's own shutdown does, so its client reconnects
                    # to a worker that stays. Checked each pass: one may upgrade during the drain.
                    _shut_down(conn)
                elif now >= idle_cutoff and (conn.cycle is None or conn.cycle.response_complete):
                    # Idle keep-alive connections that sent nothing since the drain began:
                    # the same close uvicorn's keep-alive timeout would make.
                    conn.shutdown()
            await asyncio.sleep(0.05)
        for conn in list(self.state.connections):
            _shut_down(conn)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lifespan.shutdown(), timeout=max(LIFESPAN_GRACE, deadline - loop.time()))
        self.send(Drained())
        await self._flush()
        self.done.set()

    async def _flush(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.drain(), timeout=1)

    async def _heartbeat(self) -> None:
        counters = self.counters
        while True:
            by_class, histogram = tuple(counters.by_class()), tuple(counters.histogram)
            self.send(Heartbeat(by_class, histogram, counters.in_flight, len(self.state.connections)))
            await asyncio.sleep(self.spec.heartbeat_interval)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = decode(line, PrimaryMessage)
            except MalformedMessage as exc:  # one bad line is the primary's bug, not a reason to stop serving
                print(f"clusterctl: skipped a malformed message from the primary: {exc}", file=sys.stderr)
                continue
            if isinstance(message, Accept):
                self._accept()
            elif isinstance(message, Drain):
                self.begin_drain()
        # The primary is gone (its end of the channel closed): never outlive it.
        os._exit(EXIT_PRIMARY_GONE)

    async def _date_header(self, encoded_headers: list[tuple[bytes, bytes]]) -> None:
        while True:
            date = formatdate(time.time(), usegmt=True).encode()
            self.state.default_headers = [(b"date", date), *encoded_headers]
            await asyncio.sleep(1)


def _log_access_to_stdout() -> None:
    """uvicorn's access line for each request, on stdout, which the primary keeps in workers.log.

    With `log_config=None` uvicorn leaves logging to the app, so the line needs a handler of its own;
    no timestamp (the primary stamps every line) and no propagation (an app that logs the root logger
    to stdout would print it twice).
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
    logger = logging.getLogger("uvicorn.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _not_cancelled(record: logging.LogRecord) -> bool:
    """uvicorn reports a cancelled app task as an exception in the app; ours are cancelled on purpose."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def _shut_down(conn: Any) -> None:
    # Once: a second shutdown() of a WebSocket would queue a second disconnect and close frame.
    if not conn.transport.is_closing():
        conn.shutdown()


def _listener_ids(fds: list[int]) -> dict[int, tuple[int, int]]:
    """Each inherited listening fd's socket identity (device, inode), taken before any app code runs."""
    ids = {}
    for fd in fds:
        st = os.fstat(fd)
        ids[fd] = (st.st_dev, st.st_ino)
    return ids


def _changed_listener(listeners: dict[int, tuple[int, int]]) -> str | None:
    """What is wrong if an inherited fd is no longer the listening socket the primary passed, else None.

    An app may close fds it did not open, or dup2() a socket of its own onto a low number, at
    import or in its lifespan startup. Serving what is left would report ready and serve nothing.
    """
    for fd, identity in listeners.items():
        try:
            st = os.fstat(fd)
        except OSError:
            st = None
        listening = False
        if st is not None and (st.st_dev, st.st_ino) == identity:
            probe = socket.socket(fileno=fd)
            try:
                listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            finally:
                probe.detach()  # only looked: the fd stays open for the Acceptor
        if not listening:
            return f"the app closed or replaced listening socket fd {fd}"
    return None


def _allow_ips(hosts: tuple[str, ...] | None) -> list[str] | None:
    return None if hosts is None else list(hosts)


def die_with_primary(primary_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the primary dies, however it dies.

    The signal comes when our parent dies, and a worker's parent is always the primary: a fresh
    interpreter is its child, and a fork server clones its workers as siblings of itself
    (CLONE_PARENT). So a retired or killed fork server takes no worker with it.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != primary_pid:  # it died before the line above took effect
        os._exit(EXIT_PRIMARY_GONE)


def become_worker() -> None:
    """What every worker does first, however it was started (its environment is already the worker's)."""
    die_with_primary(int(os.environ["CLUSTERCTL_PRIMARY_PID"]))
    # Terminal signals are the primary's to handle; it tells us what to do over the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A hung worker gets SIGABRT: dump every thread's stack to stderr, but leave no core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.enable()


def serve(spec: WorkerSpec, loaded: tuple[Any, str] | None) -> int:
    """Serve until drained and return the exit status. `loaded`: the app a fork server preloaded, else None."""
    channel = socket.socket(fileno=spec.channel_fd)
    listeners = _listener_ids(list(spec.listen_fds))
    if loaded is None:
        try:
            loaded = load_app(spec.target, spec.interface)
        except AppLoadError as exc:
            with contextlib.suppress(OSError):
                channel.sendall(encode(Fatal(str(exc))))
            return EXIT_BOOT_ERROR
    app, interface = loaded
    return uvloop.run(Worker(app, interface, spec, channel, listeners).run())


def warm_up() -> None:
    """Import what a worker imports lazily (uvicorn's protocols and lifespan, the WSGI adapter), once, in a fork server."""
    import a2wsgi  # noqa: F401

    for lifespan in ("on", "off"):
        config = uvicorn.Config(app=_nothing, interface="asgi3", http="httptools", lifespan=lifespan, log_config=None)
        config.load()


async def _nothing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return None


def main() -> None:
    spec = WorkerSpec.from_json(os.environ[SPEC_ENV])
    become_worker()
    sys.exit(serve(spec, None))


if __name__ == "__main__":
    main()
