"""The console's backend for a primary in another process: `clusterctl-tui attach`.

It reads the primary's live feed (`subscribe` on the control socket: snapshots,
events, worker output) and sends every action as a control command, so an
attached console shows and does what the in-process one does. Several
consoles may attach to one primary; each has its own feed.

When the primary goes away (stopped, restarted by systemd, killed) the console
says so and keeps the last picture on screen, and this backend looks for a
primary on the same store every second: a restarted primary is attached to
again without a keystroke. `q` leaves at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.control import ControlError, open_feed, request, resolve_socket
from runtime.events import EventBus
from runtime.logs import TAIL_LINES, LogLine
from runtime.snapshot import ClusterSnapshot
from runtime.wire import BYE, EVENTS, LOGS, SNAPSHOT, read_message

RETRY = 1.0  # seconds between looks for a primary to attach to again
LOST = "console.attach_lost"
RESTORED = "console.attach_restored"


class RemoteBackend:
    def __init__(self, store: Path, socket: Path | None = None) -> None:
        self.store = store
        self.socket = socket  # given with --socket: only that primary
        self.events = EventBus()
        self.running = False
        self.path: Path | None = None
        self._snapshot: ClusterSnapshot | None = None
        self._tails: dict[int, deque[LogLine]] = {}
        self._log_subscribers: list[Callable[[list[LogLine]], None]] = []
        self._first_snapshot = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Attach, and return once the first snapshot is in; ControlError (NoPrimary) if there is none."""
        await self._attach()
        self._reader = asyncio.get_running_loop().create_task(self._follow())
        await self._first_snapshot.wait()
        self.running = True

    async def wait(self) -> None:
        """Until the console closes this backend (an attached console outlives its primary)."""
        await self._closed.wait()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._closed.set()

    async def _attach(self) -> None:
        path = self.socket or resolve_socket(self.store, None)
        reader, writer = await open_feed(path, "subscribe")
        self.path = path
        self._feed = (reader, writer)

    async def _follow(self) -> None:
        while True:
            reader, writer = self._feed
            reason = "the connection to it closed"
            try:
                while line := await reader.readline():
                    try:
                        kind, value = read_message(line)
                    except ValueError:
                        continue  # a newer primary's message this console does not know
                    if kind == BYE:
                        reason = value
                    else:
                        self._take(kind, value)
            except (ConnectionError, OSError, asyncio.LimitOverrunError, ValueError) as exc:
                reason = f"the connection to it failed: {exc}"
            finally:
                writer.close()
            pid = self._snapshot.pid if self._snapshot else "?"
            self.events.publish(LOST, f"primary {pid} went away ({reason}); waiting for one to attach to")
            await self._reattach()

    async def _reattach(self) -> None:
        while True:
            await asyncio.sleep(RETRY)
            with contextlib.suppress(ControlError):
                await self._attach()
                self.events.publish(RESTORED, f"attached to the primary at {self.path}")
                return

    def _take(self, kind: str, value: Any) -> None:
        if kind == SNAPSHOT:
            self._snapshot = value
            self._first_snapshot.set()
        elif kind == EVENTS:
            for event in value:
                self.events.relay(event)
        elif kind == LOGS:
            for line in value:
                self._tails.setdefault(line.worker_id, deque(maxlen=TAIL_LINES)).append(line)
            for subscriber in list(self._log_subscribers):
                subscriber(value)

    # ------------------------------------------------------------------ what the console reads

    def snapshot(self) -> ClusterSnapshot:
        assert self._snapshot is not None
        return self._snapshot

    def worker_tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        return list(self._tails.get(worker_id, ()))[-limit:]

    def subscribe_logs(self, callback: Callable[[list[LogLine]], None]) -> Callable[[], None]:
        self._log_subscribers.append(callback)
        return lambda: self._log_subscribers.remove(callback)

    async def call(self, command: str, **args: Any) -> Any:
        """Run a command on the primary (runtime.commands); ControlError with its message."""
        if self.path is None:
            raise ControlError("not attached to a primary")
        return await asyncio.to_thread(request, self.path, command, args, None)
