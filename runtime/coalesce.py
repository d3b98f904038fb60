"""One send(2) per response: the writes a connection makes in one loop iteration, sent together.

uvicorn's HTTP protocol writes a response's status line and headers with one
`transport.write` and its body with another. uvloop sends each at once, and
with TCP_NODELAY (which every accepted socket has) each is a system call and
a TCP segment of its own: for a small response, half of the worker's time in
the kernel and twice the packets. `CoalescingTransport` sits between the
protocol and uvloop's transport and gathers the writes made before the loop
next runs its callbacks; one callback at the end of the iteration sends them
as one. Nothing waits longer than the current iteration, so latency is the same.

What must not change, and does not:
- back-pressure: once `FLUSH_AT` bytes are gathered they are sent at once, so an
  app that streams without yielding still fills uvloop's buffer, and uvloop
  still calls the protocol's `pause_writing`;
- order: every write goes through here, in order, and `close()` and
  `write_eof()` send what is gathered first; `abort()` drops it, as abort drops
  uvloop's buffer;
- the rest of the transport (peer address, reading, the protocol swap of a
  WebSocket upgrade, buffer limits) is uvloop's, reached through this one.
"""

from __future__ import annotations

import asyncio
from typing import Any

FLUSH_AT = 64 * 1024  # gathered bytes that are sent at once rather than at the end of the iteration


class CoalescingTransport(asyncio.Transport):
    __slots__ = ("_transport", "_loop", "_pending", "_pending_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None
        self._pending_size = 0

    # ---------------------------------------------------------------- writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if type(data) is not bytes:  # the caller may reuse a mutable buffer once write() returns
            data = bytes(data)
        if self._pending is None:
            self._pending = [data]
            self._pending_size = len(data)
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)
            self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            self._flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._pending_size = 0
        if self._transport.is_closing():
            return  # closed under us (the peer reset): uvloop would drop it too
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    # ---------------------------------------------------------------- ending

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._pending_size = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # ---------------------------------------------------------------- the rest is uvloop's

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()
