"""Worker output: kept as a tail per slot for the console, and written to rotating files.

Workers' stdout and stderr are pipes read by the primary. Every path a line
takes is bounded, because a worker can print faster than anything downstream
can keep up (a debug print in a loop):

- `OutputReader` splits a pipe's bytes into lines, cuts lines longer than
  `MAX_LINE`, and keeps at most `LINES_PER_SECOND` lines a second of each
  stream; the rest are counted, not decoded, and reported in one line;
- each slot's tail keeps `TAIL_LINES`;
- `logs/workers.log` (0600, in a 0700 directory beside the store: app output
  may hold secrets) is written by a background thread from a buffer of at
  most `MAX_PENDING` bytes; when the disk cannot keep up, lines are dropped
  and the count is written in their place. Nothing on the event loop waits
  on the disk.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TAIL_LINES = 200
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
MAX_LINE = 16 * 1024  # bytes; a longer line is cut into pieces of this size
LINES_PER_SECOND = 5000  # kept per worker stream; a flood beyond is counted and dropped
MAX_PENDING = 4 * 1024 * 1024  # bytes waiting for the file writer
FLUSH_INTERVAL = 0.2


@dataclass(frozen=True)
class LogLine:
    worker_id: int
    pid: int
    stream: str  # "out" | "err"
    text: str


class WorkerLogs:
    def __init__(self, directory: Path | None) -> None:
        self.tails: dict[int, deque[LogLine]] = {}
        self.subscribers: list[Callable[[LogLine], None]] = []
        self.dropped = 0  # lines not written to the file because it fell behind
        self._file: _RotatingFile | None = None
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._dropped_unreported = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stamp_second = -1
        self._stamp = ""
        self._writer: threading.Thread | None = None
        if directory is not None:
            self._file = _RotatingFile(directory / "workers.log")
            self._writer = threading.Thread(target=self._write_loop, name="clusterctl-logs", daemon=True)
            self._writer.start()

    def add(self, line: LogLine) -> None:
        self.tails.setdefault(line.worker_id, deque(maxlen=TAIL_LINES)).append(line)
        if self._file is not None:
            text = f"{self._now()} w{line.worker_id}[{line.pid}] {line.stream}| {line.text}\n"
            with self._lock:
                if self._pending_bytes + len(text) > MAX_PENDING:
                    self.dropped += 1
                    self._dropped_unreported += 1
                else:
                    self._pending.append(text)
                    self._pending_bytes += len(text)
        for subscriber in self.subscribers:
            subscriber(line)

    def tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        lines = self.tails.get(worker_id, ())
        return list(lines)[-limit:]

    def close(self) -> None:
        if self._writer is not None:
            self._closing.set()
            self._writer.join(10)
            self._writer = None

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._stamp_second:  # strftime once a second, not once a line
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(now % 1 * 1000):03d}"

    def _write_loop(self) -> None:
        assert self._file is not None
        while True:
            closing = self._closing.wait(FLUSH_INTERVAL)
            with self._lock:
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                dropped, self._dropped_unreported = self._dropped_unreported, 0
            if dropped:
                batch.append(
                    f"{self._now()} clusterctl: {dropped} worker output lines dropped (the disk fell behind)\n"
                )
            if batch:
                self._file.write("".join(batch))
            if closing:
                self._file.close()
                return


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
