"""The store: SQLite in WAL mode, shared by the primary, its workers (`emit`) and the CLI.

Table names and the columns in DESIGN.md are a contract. Everything that
touches SQL lives here, so a server database could take its place behind the
same methods. The primary never calls SQLite on its event loop: `AsyncStore`
runs every call on one writer thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000


class StoreError(Exception):
    """The store cannot be opened or written; the message names the path and why."""


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = connect(path)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {_reason(exc)}") from None

    def close(self) -> None:
        self.conn.close()

    def _migrate(self) -> None:
        db = sqlite_utils.Database(self.conn)
        db["worker_events"].create(
            {
                "id": int,
                "ts": str,
                "worker_id": int,
                "pid": int,
                "event": str,
                "exit_code": int,
                "reason": str,
                "primary_pid": int,
            },
            pk="id",
            if_not_exists=True,
        )
        db["job_runs"].create(
            {
                "id": int,
                "job": str,
                "scheduled_for": str,
                "trigger": str,
                "started_at": str,
                "finished_at": str,
                "status": str,
                "exit_code": int,
                "output": str,
                "attempt": int,
                "primary_pid": int,
            },
            pk="id",
            not_null={"job", "scheduled_for", "status"},
            if_not_exists=True,
        )
        db["webhook_events"].create(
            {"id": str, "type": str, "payload": str, "created_at": str},
            pk="id",
            if_not_exists=True,
        )
        db["webhook_deliveries"].create(
            {
                "id": int,
                "event_id": str,
                "endpoint": str,
                "attempt": int,
                "status": str,
                "response_code": int,
                "next_attempt_at": str,
                "last_error": str,
                "delivered_at": str,
            },
            pk="id",
            foreign_keys=[("event_id", "webhook_events", "id")],
            if_not_exists=True,
        )
        db["job_state"].create({"job": str, "paused": int, "updated_at": str}, pk="job", if_not_exists=True)
        db["job_runs"].create_index(["job", "scheduled_for"], unique=True, if_not_exists=True)
        db["worker_events"].create_index(["ts"], if_not_exists=True)
        db["webhook_deliveries"].create_index(["status", "next_attempt_at"], if_not_exists=True)

    # worker events

    def record_worker_event(
        self,
        worker_id: int,
        pid: int | None,
        event: str,
        exit_code: int | None = None,
        reason: str | None = None,
        primary_pid: int | None = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO worker_events (ts, worker_id, pid, event, exit_code, reason, primary_pid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (utc_now_iso(), worker_id, pid, event, exit_code, reason, primary_pid),
        )

    def worker_events(self, limit: int = 100) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT ts, worker_id, pid, event, exit_code, reason FROM worker_events ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def prune_worker_events(self, keep: int = 10_000, keep_days: float = 30.0) -> None:
        cutoff = datetime.fromtimestamp(time.time() - keep_days * 86400, UTC).isoformat().replace("+00:00", "Z")
        self.conn.execute(
            "DELETE FROM worker_events WHERE ts < ? OR id <= (SELECT MAX(id) FROM worker_events) - ?",
            (cutoff, keep),
        )

    # webhooks

    def webhook_counts(self) -> dict[str, int]:
        counts = {"pending": 0, "failed": 0, "delivered": 0, "dead": 0}
        for status, count in self.conn.execute(
            "SELECT status, COUNT(*) FROM webhook_deliveries GROUP BY status"
        ).fetchall():
            counts[status] = count
        return counts


class AsyncStore:
    """The primary's handle: every call runs on one thread, off the event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clusterctl-store")
        self.last_error: str | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Fire and forget; a failure (disk full, read-only) is kept in `last_error`, never raised."""

        def run() -> None:
            try:
                fn(*args, **kwargs)
                self.last_error = None
            except (OSError, sqlite3.Error) as exc:
                self.last_error = f"store {self.store.path}: {_reason(exc)}"

        self._executor.submit(run)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileExistsError):
        return f"{exc.filename} is not a directory"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
