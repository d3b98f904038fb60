"""The socket binder: how connections reach the workers.

This is the one seam for the distribution strategy. The primary asks a
`Listener` for the sockets to hand to each new worker, and the worker accepts
on whatever it was given (see `runtime.worker.Acceptor`). Today's strategy is
`SharedListener`: one socket bound once by the primary and inherited by every
worker, so the kernel spreads connections across the workers that accept,
evened out by the connection board of `runtime.balance`. Another strategy (per-worker SO_REUSEPORT sockets, primary-side hand-off)
replaces this class and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Protocol

from .config import parse_bind

BACKLOG = 2048


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


def bind(spec: str) -> SharedListener:
    target = parse_bind(spec)
    if isinstance(target, str):
        return _bind_unix(target)
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


def _bind_unix(path: str) -> SharedListener:
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
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
