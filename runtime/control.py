"""The control socket: how `clusterctl-tui status|scale|reload|stop` reach a running primary.

Each primary listens on `<store>.<pid>.sock` beside its store (mode 0600, and
peers of another uid are refused by SO_PEERCRED), so two primaries can share
one store. The protocol is one JSON line each way:
`{"cmd": "scale", "args": {"count": 3}}` → `{"ok": true, "result": ...}`, or
`{"ok": false, "error": "...", "interrupted": true}` when the primary stopped
before it could answer. Every request gets exactly one answer line, whatever
the client sends; encoding and decoding of both lines live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .processes import pid_alive

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]

MAX_REQUEST = 64 * 1024  # bytes in one request line; real ones are under 200
MAX_FEED_LINE = 16 * 1024 * 1024  # a snapshot of 256 workers with their histories is well under this
READ_TIMEOUT = 5.0  # seconds a client has to send its request line before it is dropped
WRITE_TIMEOUT = 30.0  # seconds a client has to take its answer (a status can be a few hundred KiB)
FEED_WRITE_TIMEOUT = 10.0  # seconds a feed's reader may fall behind before it is dropped
MAX_CONNECTIONS = 32  # served at once; a reload or `run-job --wait` holds one for minutes
ACCEPT_RETRY = 0.5  # seconds between accept attempts while the process is out of fds or memory
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

logger = logging.getLogger(__name__)


class ControlError(Exception):
    """A control command failed; the message is for the operator."""


class NoPrimary(ControlError):
    """No primary runs for this store or at this socket (the CLI exits 3, as LSB wants)."""


class Interrupted(ControlError):
    """The primary stopped, or went away, before it answered."""


def socket_path(store_path: Path, pid: int) -> Path:
    return store_path.with_name(f"{store_path.name}.{pid}.sock")


def live_sockets(store_path: Path) -> list[Path]:
    """Control sockets of primaries alive on this store; stale files of dead ones are removed."""
    found = []
    for path in sorted(store_path.parent.glob(f"{store_path.name}.*.sock")):
        pid_text = path.name[len(store_path.name) + 1 : -len(".sock")]
        if not pid_text.isdigit():
            continue
        if not pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.append(path)
    return found


def resolve_socket(store_path: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    found = live_sockets(store_path)
    if not found:
        raise NoPrimary(f"no running primary for store {store_path} (start one with: clusterctl-tui up)")
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise ControlError(f"{len(found)} primaries share store {store_path}; pick one with --socket: {names}")
    return found[0]


# ------------------------------------------------------------------ the wire format


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"cmd": self.cmd, "args": self.args}).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Request:
        """ValueError, with a reason for the client, for anything but a well-formed request."""
        try:
            message = json.loads(line, parse_constant=_refuse_constant, parse_float=_finite_float)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(message, dict):
            raise ValueError("expected a JSON object")
        cmd = message.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise ValueError('"cmd" must be a non-empty string')
        args = message.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError('"args" must be an object')
        return cls(cmd, args)


def _refuse_constant(name: str) -> float:
    # Python's json takes NaN and Infinity, which no count or id can be: int(inf) raises OverflowError.
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf without passing through parse_constant
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _answer(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def _refusal(message: str, interrupted: bool = False) -> bytes:
    reply: dict[str, Any] = {"ok": False, "error": message}
    if interrupted:
        reply["interrupted"] = True
    return json.dumps(reply).encode() + b"\n"


def _internal_error(exc: Exception) -> bytes:
    return _refusal(f"internal error: {type(exc).__name__}: {exc}")


def _decode_reply(data: bytes, path: Path) -> Any:
    if not data.endswith(b"\n"):
        how = "without answering" if not data else "in the middle of its answer"
        raise Interrupted(f"the primary at {path} closed the connection {how}")
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"the primary at {path} sent an answer that is not a JSON object")
    if not reply.get("ok"):
        kind = Interrupted if reply.get("interrupted") else ControlError
        raise kind(str(reply.get("error") or "unknown error"))
    return reply.get("result")


class _TooLong(Exception):
    pass


class Feed:
    """An answer that goes on: after the `ok` line, every line `lines` yields, until either side stops.

    The producer decides the pace and what to drop; the server only writes, and drops a reader
    that stops taking lines for FEED_WRITE_TIMEOUT. `farewell` is the last line sent when the
    primary stops the feed itself; `close` runs however the feed ends.
    """

    def __init__(
        self, lines: AsyncIterator[bytes], farewell: bytes = b"", close: Callable[[], None] | None = None
    ) -> None:
        self.lines = lines
        self.farewell = farewell
        self.close = close or (lambda: None)


# ------------------------------------------------------------------ the server


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no window where another user could connect
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot create control socket {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        """Stop accepting; a command still running (a reload) is told that the primary is stopping."""
        tasks = [*self._connections, *([self._accepting] if self._accepting else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self) -> None:
        # Our own loop rather than asyncio's server: that one logs a traceback for every failed
        # accept, and out of fds every accept fails. Here an episode is one line and a slow retry.
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        starved = False
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # that one client gave up (ECONNABORTED and the like)
                if not starved:
                    logger.warning(
                        "clusterctl-tui: control socket %s: cannot accept connections (%s); retrying every %gs",
                        self.path,
                        exc.strerror or exc,
                        ACCEPT_RETRY,
                    )
                starved = True
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            starved = False
            if len(self._connections) >= MAX_CONNECTIONS:
                _send_now(conn, _refusal(f"busy: {MAX_CONNECTIONS} control connections are open; try again"))
                conn.close()
                continue
            task = loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            try:
                reply = await self._reply(conn)
            except asyncio.CancelledError:
                _send_now(conn, _refusal("the primary is stopping", interrupted=True))
                raise
            except OSError:
                return  # the client went away while we read
            feed = None
            if isinstance(reply, Feed):
                feed, reply = reply, _answer({"feed": True})
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await loop.sock_sendall(conn, reply)
                if feed is not None:
                    await _stream(conn, feed)
            except (OSError, TimeoutError):
                pass  # the client left, or stopped reading
            finally:
                if feed is not None:
                    feed.close()

    async def _reply(self, conn: socket.socket) -> bytes | Feed:
        if not _same_user(conn):
            return _refusal("permission denied: not the primary's user")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await _read_line(conn)
        except TimeoutError:
            return _refusal(f"bad request: no request within {READ_TIMEOUT:g}s")
        except _TooLong:
            return _refusal("bad request: request too long")
        try:
            request = Request.decode(line)
        except ValueError as exc:
            return _refusal(f"bad request: {exc}")
        try:
            result = await self.handler(request.cmd, request.args)
        except ControlError as exc:
            return _refusal(str(exc))
        except KeyError as exc:
            return _refusal(f"bad request: missing argument {exc}")
        except (ValueError, TypeError) as exc:  # the handler could not use an argument
            return _refusal(f"bad request: {exc}")
        except Exception as exc:  # a bug in one command must not stop the primary answering the next
            return _internal_error(exc)
        if isinstance(result, Feed):
            return result
        try:
            return _answer(result)
        except (TypeError, ValueError) as exc:  # a result JSON cannot carry is our bug, not the client's
            return _internal_error(exc)


async def _stream(conn: socket.socket, feed: Feed) -> None:
    loop = asyncio.get_running_loop()
    try:
        async for line in feed.lines:
            async with asyncio.timeout(FEED_WRITE_TIMEOUT):
                await loop.sock_sendall(conn, line)
    except asyncio.CancelledError:
        _send_now(conn, feed.farewell)
        raise


async def _read_line(conn: socket.socket) -> bytes:
    """The request line (without its newline); _TooLong past MAX_REQUEST bytes."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            raise _TooLong
        chunk = await loop.sock_recv(conn, 65536)
        if not chunk:
            break  # a client may half-close instead of sending the newline
        data += chunk
    line = data.partition(b"\n")[0]
    if len(line) > MAX_REQUEST:
        raise _TooLong
    return line


def _send_now(conn: socket.socket, data: bytes) -> None:
    """A short last word without waiting: fits in the socket buffer, and a gone client is no error."""
    with contextlib.suppress(OSError):
        conn.send(data)


def _same_user(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


# ------------------------------------------------------------------ the client


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = 10.0) -> Any:
    """Send one command and return its result.

    ControlError with the primary's message on failure; NoPrimary when nothing listens at `path`;
    Interrupted when the connection ends before the answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _talking_to(path, timeout):
            sock.connect(str(path))
            # A server that turns us away (busy) may close before we finish sending; its reason is still readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(Request(cmd, args or {}).encode())
            data = _read_reply(sock)
    finally:
        sock.close()
    return _decode_reply(data, path)


@contextlib.contextmanager
def _talking_to(path: Path, timeout: float | None) -> Iterator[None]:
    """What went wrong reaching the primary at `path`, as one ControlError (NoPrimary: nothing there)."""
    try:
        yield
    except FileNotFoundError:
        raise NoPrimary(f"no primary is running at {path} (no such socket)") from None
    except ConnectionRefusedError:
        raise NoPrimary(f"no primary is listening at {path} (a stale socket?)") from None
    except TimeoutError:
        raise ControlError(f"the primary at {path} did not answer within {timeout or 0:g}s") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as the primary's user") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the primary at {path}: {exc.strerror or exc}") from None


async def open_feed(
    path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start a feed command; returns the connection, positioned after the `ok` line (the feed's lines follow).

    The same errors as `request`. Close the writer to end the feed.
    """
    with _talking_to(path, timeout):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_FEED_LINE)
            writer.write(Request(cmd, args or {}).encode())
            first = await reader.readline()
    try:
        _decode_reply(first, path)
    except ControlError:
        writer.close()
        raise
    return reader, writer


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            # A server that closes with our request unread (busy, too long) resets the connection,
            # but only after its answer, which we have read by then.
            break
        if not chunk:
            break
        data += chunk
    return data
