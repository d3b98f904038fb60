"""The control socket: how `clusterctl-tui status|scale|reload|stop` reach a running primary.

Each primary listens on `<store>.<pid>.sock` beside its store (mode 0600, and
peers of another uid are refused by SO_PEERCRED), so two primaries can share
one store. The protocol is one JSON line each way:
`{"cmd": "scale", "args": {"count": 3}}` → `{"ok": true, "result": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .processes import pid_alive

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """A control command failed; the message is for the operator."""


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
        raise ControlError(f"no running primary for store {store_path} (start one with: clusterctl-tui up)")
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise ControlError(f"{len(found)} primaries share store {store_path}; pick one with --socket: {names}")
    return found[0]


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.Server | None = None

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
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=1 << 20)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer.get_extra_info("socket")):
                reply: dict[str, Any] = {"ok": False, "error": "permission denied: not the primary's user"}
            else:
                line = await reader.readline()
                try:
                    request = json.loads(line)
                    result = await self.handler(str(request["cmd"]), dict(request.get("args") or {}))
                    reply = {"ok": True, "result": result}
                except ControlError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def _same_user(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def request(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = 10.0) -> Any:
    """Send one command and return its result; ControlError with the primary's message on failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}") from None
    except ConnectionRefusedError:
        raise ControlError(f"the primary at {path} is not answering (stale socket?)") from None
    except TimeoutError:
        raise ControlError(f"the primary at {path} did not answer within {timeout:g}s") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as the primary's user") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(f"the primary at {path} closed the connection without answering")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")
