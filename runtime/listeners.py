"""The socket binder: how connections reach the workers.

This is the one seam for the distribution strategy. The primary asks a
`Listener` for the sockets to hand to each new worker, and the worker accepts
on whatever it was given (see `runtime.worker.Acceptor`). Today's strategy is
`SharedListener`: one socket bound once by the primary and inherited by every
worker, so the kernel spreads connections across the workers that accept,
evened out by the connection board of `runtime.balance`. Another strategy
(per-worker SO_REUSEPORT sockets, primary-side hand-off) replaces this class
and nothing else. `InheritedListener` is the same strategy on sockets someone
else bound: systemd's, under socket activation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Protocol

from .channel import BACKLOG
from .config import ServerConfig, parse_bind


class BindError(Exception):
    """The address cannot be bound; the message names it and why."""


class Listener(Protocol):
    address: str

    def sockets_for_worker(self, slot: int) -> list[socket.socket]: ...

    def close(self) -> None: ...


class SharedListener:
    """One listening socket, bound once, inherited by every worker."""

    def __init__(self, sock: socket.socket, address: str, unix_path: str | None) -> None:
        self.sock = sock
        self.address = address
        self._unix_path = unix_path

    def sockets_for_worker(self, slot: int) -> list[socket.socket]:
        return [self.sock]

    def close(self) -> None:
        self.sock.close()
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)


class InheritedListener:
    """Listening sockets passed in by the service manager (socket activation), inherited by every worker.

    Closing drops only our descriptors: systemd keeps the sockets open, so connections that arrive
    while the primary restarts wait in the backlog, and a unix socket's file is systemd's to remove.
    """

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.address = ", ".join(_describe(sock) for sock in socks)

    def sockets_for_worker(self, slot: int) -> list[socket.socket]:
        return list(self.socks)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def inherit(fds: list[int]) -> InheritedListener:
    """A listener on descriptors we were given (systemd's LISTEN_FDS); BindError names one that cannot serve."""
    socks: list[socket.socket] = []
    try:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
            except OSError as exc:
                raise BindError(f"inherited fd {fd} (LISTEN_FDS) is not a socket: {exc.strerror or exc}") from None
            socks.append(sock)
            if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type != socket.SOCK_STREAM:
                raise BindError(
                    f"inherited fd {fd} (LISTEN_FDS) is a {_name(sock.family)} {_name(sock.type)} socket;"
                    " HTTP needs a stream socket (ListenStream=)"
                )
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise BindError(f"inherited fd {fd} (LISTEN_FDS) is not listening ({_describe(sock)})")
            # systemd passes it inheritable: only the workers get it (pass_fds), not jobs or before_start.
            sock.set_inheritable(False)
    except BindError:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise BindError("LISTEN_FDS passed no socket")
    return InheritedListener(socks)


def _name(constant: object) -> str:
    return getattr(constant, "name", str(constant))  # a family Python has no name for is a bare int


def _describe(sock: socket.socket) -> str:
    """The address as `bind` would spell it: host:port, [v6]:port or unix:/path."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # abstract: a leading NUL, shown as @ the way ss(8) does
            return "unix:@" + name[1:].decode(errors="replace")
        return f"unix:{name}" if name else "unix:(unnamed)"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def bind(spec: str, socket_mode: int = ServerConfig.socket_mode) -> SharedListener:
    """Bind `spec`; a unix: socket file gets `socket_mode` (so a proxy in the group can connect)."""
    target = parse_bind(spec)
    if isinstance(target, str):
        return _bind_unix(target, socket_mode)
    host, port = target
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_message(spec, exc)) from None
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return SharedListener(sock, f"{shown}:{real_port}", None)


def _bind_unix(path: str, socket_mode: int) -> SharedListener:
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then every connect() is refused, so no one gets in under the mode
        # the umask gave the file. A chmod, not a umask around bind: the umask is the whole process's.
        os.chmod(path, socket_mode)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_message(f"unix:{path}", exc)) from None
    return SharedListener(sock, f"unix:{path}", path)


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a dead server is removed; a live one is an 'in use' error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BindError(f"cannot bind unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise BindError(f"cannot bind unix:{path}: address already in use (another server answers there)")


def _bind_message(spec: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot bind {spec}: address already in use"
    if exc.errno == errno.EACCES:
        return f"cannot bind {spec}: permission denied"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {spec}: address not available on this machine"
    return f"cannot bind {spec}: {exc.strerror or exc}"
