"""Worker output: kept as a tail per slot, handed to subscribers in batches, written to rotating files.

Workers' stdout and stderr are pipes read by the primary. Every path a line
takes is bounded, because a worker can print faster than anything downstream
can keep up (a debug print in a loop):

- `OutputReader` splits a pipe's bytes into lines, cuts lines longer than
  `MAX_LINE`, and keeps at most `LINES_PER_SECOND` lines a second of each
  stream; the rest are counted, not decoded, and reported in one line;
- each slot's tail keeps `TAIL_LINES`;
- subscribers (the console's events view) are never called from `add`, which
  runs on the loop that also reaps workers: each has a buffer of at most
  `MAX_SUBSCRIBER_LINES`, and one timer hands every subscriber its batch each
  `FANOUT_INTERVAL`. Lines beyond the buffer are counted, and the batch then
  ends with a line from clusterctl itself: `worker_id` 0 and `pid` 0 (no slot
  or process has either), stream "err". A subscriber that raises is dropped;
- `logs/workers.log` (0600, in a 0700 directory beside the store: app output
  may hold secrets) is written by a background thread from a buffer of at
  most `MAX_PENDING` bytes; when the disk cannot keep up, lines are dropped
  and the count is written in their place;
- with `echo` (a file descriptor: the headless primary's stderr, for
  journald), each line is also written there as `w<slot>[<pid>] <text>`, by a
  thread of its own from a buffer of at most `MAX_ECHO_PENDING` bytes, so a
  stderr that nobody reads stops neither the workers nor workers.log.

Nothing on the event loop waits on the disk, on stderr or on a subscriber
that fell behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TAIL_LINES = 200
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
MAX_LINE = 16 * 1024  # bytes; a longer line is cut into pieces of this size
LINES_PER_SECOND = 5000  # kept per worker stream; a flood beyond is counted and dropped
MAX_PENDING = 4 * 1024 * 1024  # bytes waiting for the file writer
MAX_ECHO_PENDING = 1024 * 1024  # bytes waiting for the echo writer
FLUSH_INTERVAL = 0.2
ECHO_CLOSE_TIMEOUT = 2.0  # seconds to flush the echo at shutdown; a stuck stderr must not hold the stop
MAX_SUBSCRIBER_LINES = 2000  # lines waiting for one subscriber between two deliveries
FANOUT_INTERVAL = 0.1  # seconds between deliveries to subscribers
STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # then ",<ms>": the start of each line of workers.log

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogLine:
    worker_id: int  # 0: a note from clusterctl itself
    pid: int
    stream: str  # "out" | "err"
    text: str


LogSubscriber = Callable[[list[LogLine]], None]


@dataclass(eq=False)  # removed by identity: two may hold the same callback
class _Subscription:
    callback: LogSubscriber
    lines: list[LogLine] = field(default_factory=list)
    dropped: int = 0


class WorkerLogs:
    def __init__(self, directory: Path | None, echo: int | None = None) -> None:
        self.tails: dict[int, deque[LogLine]] = {}
        self._subscriptions: list[_Subscription] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stamp_second = -1
        self._stamp = ""
        self._file: _BoundedWriter | None = None
        self._echo: _BoundedWriter | None = None
        if directory is not None:
            target = _RotatingFile(directory / "workers.log")
            self._file = _BoundedWriter(
                "clusterctl-logs",
                MAX_PENDING,
                target.write,
                lambda n: f"{_stamp(time.time())} clusterctl: {n} worker output lines dropped (the disk fell behind)\n",
                target.close,
            )
        if echo is not None:
            self._echo = _BoundedWriter(
                "clusterctl-echo",
                MAX_ECHO_PENDING,
                functools.partial(_write_all, echo),
                lambda n: f"clusterctl: {n} worker output lines not echoed here (stderr fell behind)\n",
                lambda: None,
            )

    @property
    def dropped(self) -> int:
        """Lines not written to workers.log because the disk fell behind."""
        return self._file.dropped if self._file is not None else 0

    @property
    def echo_dropped(self) -> int:
        """Lines not echoed because the echo's reader fell behind."""
        return self._echo.dropped if self._echo is not None else 0

    def add(self, line: LogLine) -> None:
        """Keep a line and queue it for every sink; called on the event loop, never waits on any of them."""
        self.tails.setdefault(line.worker_id, deque(maxlen=TAIL_LINES)).append(line)
        if self._file is not None:
            self._file.put(f"{self._now()} w{line.worker_id}[{line.pid}] {line.stream}| {line.text}\n")
        if self._echo is not None:
            self._echo.put(f"w{line.worker_id}[{line.pid}] {line.text}\n")
        if not self._subscriptions:
            return
        for subscription in self._subscriptions:
            if len(subscription.lines) < MAX_SUBSCRIBER_LINES:
                subscription.lines.append(line)
            else:
                subscription.dropped += 1
        if self._timer is None:  # armed only while lines wait: an idle cluster has no timer ticking
            self._timer = asyncio.get_running_loop().call_later(FANOUT_INTERVAL, self._fan_out)

    def subscribe(self, callback: LogSubscriber) -> Callable[[], None]:
        """Have `callback` called on the event loop with the lines that arrived, at most every FANOUT_INTERVAL.

        Returns the unsubscribe. A callback that raises is unsubscribed (and the error logged).
        """
        subscription = _Subscription(callback)
        self._subscriptions.append(subscription)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscriptions.remove(subscription)

        return unsubscribe

    def tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        lines = self.tails.get(worker_id, ())
        return list(lines)[-limit:]

    def close(self) -> None:
        """Hand subscribers what is left, then flush and stop the writer threads."""
        if self._timer is not None:
            self._timer.cancel()
            self._fan_out()
        if self._file is not None:
            self._file.close(10)
        if self._echo is not None:
            self._echo.close(ECHO_CLOSE_TIMEOUT)

    def _fan_out(self) -> None:
        self._timer = None
        for subscription in list(self._subscriptions):  # a callback may unsubscribe itself
            batch, subscription.lines = subscription.lines, []
            if subscription.dropped:
                note = (
                    f"[clusterctl: {subscription.dropped} worker output lines skipped here: "
                    f"more than {MAX_SUBSCRIBER_LINES} came between two deliveries]"
                )
                batch.append(LogLine(0, 0, "err", note))
                subscription.dropped = 0
            if not batch:
                continue
            try:
                subscription.callback(batch)
            except Exception:  # a broken view must not break the loop that reaps workers
                logger.exception("worker output subscriber %r failed; unsubscribed", subscription.callback)
                with contextlib.suppress(ValueError):
                    self._subscriptions.remove(subscription)

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._stamp_second:  # strftime once a second, not once a line
            self._stamp_second = second
            self._stamp = time.strftime(STAMP_FORMAT, time.localtime(second))
        return f"{self._stamp},{int(now % 1 * 1000):03d}"


def _stamp(now: float) -> str:
    """The same stamp as `WorkerLogs._now`, for the writer thread (that cache belongs to the loop)."""
    return time.strftime(STAMP_FORMAT, time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


class _BoundedWriter:
    """A thread that writes what `put` queues; at most `limit` bytes wait, the lines beyond are dropped and counted.

    Every FLUSH_INTERVAL it writes the queue in one piece, ended by `note(count)` when lines were dropped.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        write: Callable[[str], None],
        note: Callable[[int], str],
        finish: Callable[[], None],
    ) -> None:
        self.dropped = 0
        self._limit = limit
        self._write = write
        self._note = note
        self._finish = finish
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._unreported = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, text: str) -> None:
        with self._lock:
            if self._pending_bytes + len(text) > self._limit:
                self.dropped += 1
                self._unreported += 1
            else:
                self._pending.append(text)
                self._pending_bytes += len(text)

    def close(self, timeout: float) -> None:
        self._closing.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            closing = self._closing.wait(FLUSH_INTERVAL)
            with self._lock:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                dropped, self._unreported = self._unreported, 0
            if dropped:
                batch.append(self._note(dropped))
            if batch:
                self._write("".join(batch))
            if closing:
                self._finish()
                return


def _write_all(fd: int, text: str) -> None:
    """Write all of `text` to a descriptor we do not own (stderr), blocking; an error loses it, never raises.

    The descriptor stays blocking: O_NONBLOCK belongs to the open file, shared with every other
    writer of it (the primary's own prints to stderr), which would then fail on a full pipe.
    """
    data = memoryview(text.encode("utf-8", "replace"))
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:  # stderr closed or gone: the lines are still in workers.log
        pass


class _RotatingFile:
    """workers.log, rotated at MAX_BYTES into .1 … .BACKUPS; a write error is kept, never raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)  # an older version made it 0755
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        try:
            if os.fstat(self._fd).st_size + len(data) > MAX_BYTES:
                self._rotate()
            os.write(self._fd, data)
            self.error = None
        except OSError as exc:  # a full disk loses log lines, never the cluster
            self.error = f"{self.path}: {exc.strerror or exc}"

    def _rotate(self) -> None:
        os.close(self._fd)
        for n in range(BACKUPS - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")
        self._fd = self._open()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class OutputReader:
    """One worker stream: bytes from its pipe in, bounded lines out to `WorkerLogs.add`."""

    def __init__(self, logs: WorkerLogs, worker_id: int, pid: int, stream: str) -> None:
        self.logs = logs
        self.worker_id = worker_id
        self.pid = pid
        self.stream = stream
        self.dropped = 0
        self._partial = bytearray()
        self._window = 0
        self._kept = 0
        self._skipped = 0

    def feed(self, chunk: bytes) -> None:
        window = int(time.monotonic())
        if window != self._window:
            self._report_skipped()
            self._window, self._kept = window, 0
        if self._kept >= LINES_PER_SECOND:
            # Over budget: count the lines without decoding them, keep only an unfinished tail.
            skipped = chunk.count(b"\n")
            if skipped:
                self._skipped += skipped
                self._partial[:] = chunk[chunk.rindex(b"\n") + 1 :][:MAX_LINE]
            else:
                self._partial.extend(chunk[: MAX_LINE - len(self._partial)])
            return
        self._partial.extend(chunk)
        *lines, rest = self._partial.split(b"\n")
        self._partial[:] = rest
        for line in lines:
            self._emit(line)
        while len(self._partial) > MAX_LINE:
            self._emit(bytes(self._partial[:MAX_LINE]))
            del self._partial[:MAX_LINE]

    def close(self) -> None:
        if self._partial:
            self._emit(bytes(self._partial))
            self._partial.clear()
        self._report_skipped()

    def _emit(self, raw: bytes) -> None:
        if self._kept >= LINES_PER_SECOND:
            self._skipped += 1
            return
        self._kept += 1
        text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        self.logs.add(LogLine(self.worker_id, self.pid, self.stream, text))

    def _report_skipped(self) -> None:
        if self._skipped:
            self.dropped += self._skipped
            note = f"[clusterctl: {self._skipped} lines dropped: over {LINES_PER_SECOND} lines a second]"
            self._skipped = 0
            self.logs.add(LogLine(self.worker_id, self.pid, self.stream, note))
