"""Worker output: kept as a tail per slot for the console, and written to rotating files.

Workers' stdout and stderr are pipes read by the primary. Each line goes to
the slot's tail (so a crashed worker's last words are one key away) and to
`logs/workers.log` beside the store, written by a background thread so disk
I/O never blocks the event loop.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TAIL_LINES = 200
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


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
        self._logger = logging.getLogger(f"clusterctl.workers.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._listener: logging.handlers.QueueListener | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                directory / "workers.log", maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            self._logger.addHandler(logging.handlers.QueueHandler(q))
            self._listener = logging.handlers.QueueListener(q, handler)
            self._listener.start()

    def add(self, line: LogLine) -> None:
        self.tails.setdefault(line.worker_id, deque(maxlen=TAIL_LINES)).append(line)
        self._logger.info("w%d[%d] %s| %s", line.worker_id, line.pid, line.stream, line.text)
        for subscriber in self.subscribers:
            subscriber(line)

    def tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        lines = self.tails.get(worker_id, ())
        return list(lines)[-limit:]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
