"""The store: SQLite in WAL mode, shared by the primary, its workers (`emit`) and the CLI.

Table names and the columns in DESIGN.md are a contract. Everything that
touches SQL lives here, so a server database could take its place behind the
same methods. The primary never calls SQLite on its event loop: `AsyncStore`
runs every call on one writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000


class StoreError(Exception):
    """The store cannot be opened or written; the message names the path and why."""


def iso_at(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and a Z, the one format every stored time uses (so strings sort)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    return iso_at(time.time())


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    """`clock` (seconds since the epoch) stamps and ages every row, so tests can pin "now"."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = connect(path)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {_reason(exc)}") from None

    def close(self) -> None:
        self.conn.close()

    def _now(self) -> str:
        return iso_at(self.clock())

    def _iso_in(self, seconds: float) -> str:
        return iso_at(self.clock() + seconds)

    def _iso_days_ago(self, days: float) -> str:
        return iso_at(self.clock() - days * 86400)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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
                "created_at": str,
                "replay_of": int,
                "leased_by": int,
                "lease_until": str,
            },
            pk="id",
            foreign_keys=[("event_id", "webhook_events", "id")],
            if_not_exists=True,
        )
        db["job_state"].create(
            {"job": str, "paused": int, "last_slot": str, "updated_at": str}, pk="job", if_not_exists=True
        )
        db["job_attempts"].create(
            {
                "id": int,
                "run_id": int,
                "attempt": int,
                "started_at": str,
                "finished_at": str,
                "status": str,
                "exit_code": int,
                "output": str,
            },
            pk="id",
            if_not_exists=True,
        )
        db["webhook_endpoints"].create(
            {"name": str, "url": str, "events": str, "max_attempts": int, "enabled": int, "disabled_reason": str},
            pk="name",
            if_not_exists=True,
        )
        db["job_runs"].create_index(["job", "scheduled_for"], unique=True, if_not_exists=True)
        db["worker_events"].create_index(["ts"], if_not_exists=True)
        db["webhook_deliveries"].create_index(["endpoint", "status", "next_attempt_at"], if_not_exists=True)
        db["webhook_deliveries"].create_index(["event_id"], if_not_exists=True)

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
            (self._now(), worker_id, pid, event, exit_code, reason, primary_pid),
        )

    def worker_events(self, limit: int = 100) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT ts, worker_id, pid, event, exit_code, reason FROM worker_events ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def prune_worker_events(self, keep: int = 10_000, keep_days: float = 30.0) -> None:
        cutoff = self._iso_days_ago(keep_days)
        self.conn.execute(
            "DELETE FROM worker_events WHERE ts < ? OR id <= (SELECT MAX(id) FROM worker_events) - ?",
            (cutoff, keep),
        )

    # jobs

    def claim_slot(
        self, job: str, scheduled_for: str, trigger: str, primary_pid: int, overlap: str = "allow"
    ) -> tuple[str, int | None, list[int]]:
        """Claim one slot of a job: an insert under UNIQUE(job, scheduled_for), in one write transaction.

        Returns ("claimed", run_id, running_ids), ("skipped", run_id, running_ids) when overlap is
        "skip" and a run of the job is still going (on any primary), or ("lost", None, []) when
        another primary claimed the slot first. `running_ids` are the runs a "replace" must end.
        """
        now = self._now()
        with self.transaction():
            running = [
                row[0]
                for row in self.conn.execute(
                    "SELECT id FROM job_runs WHERE job = ? AND status = 'running'", (job,)
                ).fetchall()
            ]
            skip = overlap == "skip" and bool(running)
            try:
                cursor = self.conn.execute(
                    "INSERT INTO job_runs (job, scheduled_for, trigger, started_at, finished_at, status, output,"
                    " attempt, primary_pid) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                    (
                        job,
                        scheduled_for,
                        trigger,
                        now,
                        now if skip else None,
                        "skipped" if skip else "running",
                        f"skipped: run {running[0]} of this job was still running (overlap = skip)" if skip else "",
                        primary_pid,
                    ),
                )
            except sqlite3.IntegrityError:
                lost = True
            else:
                lost = False
                if trigger != "manual":
                    self.mark_slot(job, scheduled_for)
        if lost:
            return "lost", None, []
        return ("skipped" if skip else "claimed"), cursor.lastrowid, running

    def record_skipped(self, job: str, scheduled_for: str, trigger: str, reason: str, primary_pid: int) -> bool:
        """A slot that will not run, and why; False if the slot already has a row."""
        now = self._now()
        try:
            self.conn.execute(
                "INSERT INTO job_runs (job, scheduled_for, trigger, started_at, finished_at, status, output, attempt,"
                " primary_pid) VALUES (?, ?, ?, ?, ?, 'skipped', ?, 0, ?)",
                (job, scheduled_for, trigger, now, now, reason, primary_pid),
            )
        except sqlite3.IntegrityError:
            return False
        finally:
            self.mark_slot(job, scheduled_for)
        return True

    def mark_slot(self, job: str, scheduled_for: str) -> None:
        """Remember the newest slot this job has seen, so catch-up knows where to resume."""
        self.conn.execute(
            "INSERT INTO job_state (job, paused, last_slot, updated_at) VALUES (?, 0, ?, ?)"
            " ON CONFLICT(job) DO UPDATE SET last_slot = MAX(COALESCE(last_slot, ''), excluded.last_slot)",
            (job, scheduled_for, self._now()),
        )

    def last_slot(self, job: str) -> str | None:
        row = self.conn.execute("SELECT last_slot FROM job_state WHERE job = ?", (job,)).fetchone()
        return row[0] if row else None

    def begin_attempt(self, run_id: int, attempt: int) -> None:
        self.conn.execute(
            "UPDATE job_runs SET attempt = ?, status = 'running', finished_at = NULL WHERE id = ?", (attempt, run_id)
        )

    def finish_attempt(
        self, run_id: int, attempt: int, started_at: str, status: str, exit_code: int | None, output: str, final: bool
    ) -> None:
        now = self._now()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO job_attempts (run_id, attempt, started_at, finished_at, status, exit_code, output)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, attempt, started_at, now, status, exit_code, output),
            )
            self.conn.execute(
                "UPDATE job_runs SET status = ?, exit_code = ?, output = ?, finished_at = ? WHERE id = ?",
                (status if final else "running", exit_code, output, now if final else None, run_id),
            )

    def abandon_runs(self, alive: Callable[[int], bool], reason: str) -> list[int]:
        """Mark `running` rows whose primary is gone as `abandoned`."""
        rows = self.conn.execute("SELECT id, primary_pid FROM job_runs WHERE status = 'running'").fetchall()
        dead = [run_id for run_id, pid in rows if pid is None or not alive(pid)]
        for run_id in dead:
            self.conn.execute(
                "UPDATE job_runs SET status = 'abandoned', finished_at = ?, output = COALESCE(output, '') || ?"
                " WHERE id = ?",
                (self._now(), reason, run_id),
            )
        return dead

    def set_paused(self, job: str, paused: bool) -> None:
        self.conn.execute(
            "INSERT INTO job_state (job, paused, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(job) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at",
            (job, int(paused), self._now()),
        )

    def paused_jobs(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT job FROM job_state WHERE paused = 1")}

    def last_statuses(self) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT job, status FROM job_runs WHERE id IN (SELECT MAX(id) FROM job_runs GROUP BY job)"
        ).fetchall()
        return dict(rows)

    def job_history(self, job: str | None = None, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        clauses, params = [], []
        if job:
            clauses.append("job = ?")
            params.append(job)
        if status:
            clauses.append("status = ?")
            params.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        cursor = self.conn.execute(
            "SELECT id, job, scheduled_for, trigger, started_at, finished_at, status, exit_code, output, attempt"
            f" FROM job_runs {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def prune_job_runs(self, keep_runs: int, keep_days: float) -> int:
        cutoff = self._iso_days_ago(keep_days)
        with self.transaction():
            cursor = self.conn.execute(
                "DELETE FROM job_runs WHERE status != 'running' AND (scheduled_for < ? OR id IN ("
                " SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY job ORDER BY id DESC) AS n"
                " FROM job_runs) WHERE n > ?))",
                (cutoff, keep_runs),
            )
            self.conn.execute("DELETE FROM job_attempts WHERE run_id NOT IN (SELECT id FROM job_runs)")
        return cursor.rowcount

    # webhooks

    def webhook_counts(self) -> dict[str, int]:
        """pending (not yet tried), failed (last attempt failed: retrying or dead), delivered, and dead alone."""
        counts = dict(self.conn.execute("SELECT status, COUNT(*) FROM webhook_deliveries GROUP BY status").fetchall())
        return {
            "pending": counts.get("pending", 0),
            "failed": counts.get("failed", 0) + counts.get("dead", 0),
            "delivered": counts.get("delivered", 0),
            "dead": counts.get("dead", 0),
        }

    def endpoint_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for endpoint, status, count in self.conn.execute(
            "SELECT endpoint, status, COUNT(*) FROM webhook_deliveries GROUP BY endpoint, status"
        ):
            counts.setdefault(endpoint, {})[status] = count
        return counts

    def sync_endpoints(self, endpoints: list[dict[str, Any]]) -> None:
        """Publish the configured endpoints (never their secrets) for `emit()` in any process to fan out to."""
        with self.transaction():
            names = [e["name"] for e in endpoints]
            self.conn.execute(
                f"UPDATE webhook_endpoints SET enabled = 0, disabled_reason = 'removed from the config'"
                f" WHERE name NOT IN ({','.join('?' * len(names))})",
                names,
            )
            for e in endpoints:
                self.conn.execute(
                    "INSERT INTO webhook_endpoints (name, url, events, max_attempts, enabled, disabled_reason)"
                    " VALUES (?, ?, ?, ?, 1, NULL) ON CONFLICT(name) DO UPDATE SET url = excluded.url,"
                    " events = excluded.events, max_attempts = excluded.max_attempts, enabled = 1,"
                    " disabled_reason = NULL",
                    (e["name"], e["url"], json.dumps(e["events"]), e["max_attempts"]),
                )

    def disable_endpoint(self, name: str, reason: str) -> None:
        self.conn.execute(
            "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ? WHERE name = ?", (reason, name)
        )

    def kill_queue(self, endpoint: str, reason: str) -> int:
        """Every queued delivery of a disabled endpoint becomes dead (replayable), with the reason."""
        return self.conn.execute(
            "UPDATE webhook_deliveries SET status = 'dead', last_error = ?, leased_by = NULL, lease_until = NULL"
            " WHERE endpoint = ? AND status IN ('pending', 'failed')",
            (reason, endpoint),
        ).rowcount

    def endpoints(self) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT name, url, events, max_attempts, enabled, disabled_reason FROM webhook_endpoints"
        )
        rows = []
        for name, url, events, max_attempts, enabled, reason in cursor.fetchall():
            rows.append(
                {
                    "name": name,
                    "url": url,
                    "events": json.loads(events),
                    "max_attempts": max_attempts,
                    "enabled": bool(enabled),
                    "disabled_reason": reason,
                }
            )
        return rows

    def emit(self, event_id: str, kind: str, payload: str, endpoints: list[str]) -> None:
        """The event and one pending delivery per matching endpoint, in one transaction."""
        now = self._now()
        with self.transaction():
            self.conn.execute(
                "INSERT INTO webhook_events (id, type, payload, created_at) VALUES (?, ?, ?, ?)",
                (event_id, kind, payload, now),
            )
            self.conn.executemany(
                "INSERT INTO webhook_deliveries (event_id, endpoint, attempt, status, next_attempt_at, created_at)"
                " VALUES (?, ?, 0, 'pending', ?, ?)",
                [(event_id, name, now, now) for name in endpoints],
            )

    def lease_deliveries(self, endpoint: str, owner: int, limit: int, lease_seconds: float) -> list[dict[str, Any]]:
        """Take up to `limit` due deliveries of one endpoint for `owner` (a primary's pid) for a while."""
        now = self._now()
        until = self._iso_in(lease_seconds)
        with self.transaction():
            rows = self.conn.execute(
                "SELECT d.id, d.event_id, d.attempt, e.type, e.payload, e.created_at FROM webhook_deliveries d"
                " JOIN webhook_events e ON e.id = d.event_id"
                " WHERE d.endpoint = ? AND d.status IN ('pending', 'failed') AND d.next_attempt_at <= ?"
                " AND (d.lease_until IS NULL OR d.lease_until < ?) ORDER BY d.next_attempt_at, d.id LIMIT ?",
                (endpoint, now, now, limit),
            ).fetchall()
            self.conn.executemany(
                "UPDATE webhook_deliveries SET leased_by = ?, lease_until = ? WHERE id = ?",
                [(owner, until, row[0]) for row in rows],
            )
        keys = ("id", "event_id", "attempt", "type", "payload", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def release_leases(self, alive: Callable[[int], bool]) -> int:
        """Leases held by primaries that died go back to the queue at once."""
        owners = [
            row[0]
            for row in self.conn.execute(
                "SELECT DISTINCT leased_by FROM webhook_deliveries WHERE leased_by IS NOT NULL"
                " AND status IN ('pending', 'failed')"
            )
        ]
        released = 0
        for owner in owners:
            if not alive(owner):
                released += self.conn.execute(
                    "UPDATE webhook_deliveries SET leased_by = NULL, lease_until = NULL WHERE leased_by = ?",
                    (owner,),
                ).rowcount
        return released

    def finish_delivery(
        self,
        delivery_id: int,
        attempt: int,
        status: str,
        response_code: int | None,
        error: str | None,
        next_attempt_in: float | None,
    ) -> None:
        now = self._now()
        self.conn.execute(
            "UPDATE webhook_deliveries SET attempt = ?, status = ?, response_code = ?, last_error = ?,"
            " next_attempt_at = ?, delivered_at = ?, leased_by = NULL, lease_until = NULL WHERE id = ?",
            (
                attempt,
                status,
                response_code,
                error,
                self._iso_in(next_attempt_in) if next_attempt_in is not None else None,
                now if status == "delivered" else None,
                delivery_id,
            ),
        )

    def replay(
        self,
        delivery_id: int | None = None,
        endpoint: str | None = None,
        since: str | None = None,
        until: str | None = None,
        statuses: tuple[str, ...] = ("dead", "failed", "delivered"),
    ) -> list[int]:
        """New pending deliveries for the same events (same webhook-id); returns their ids."""
        clauses, params = [], []
        if delivery_id is not None:
            clauses.append("d.id = ?")
            params.append(delivery_id)
        else:
            clauses.append(f"d.status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        if endpoint:
            clauses.append("d.endpoint = ?")
            params.append(endpoint)
        if since:
            clauses.append("e.created_at >= ?")
            params.append(since)
        if until:
            clauses.append("e.created_at <= ?")
            params.append(until)
        now = self._now()
        created = []
        with self.transaction():
            rows = self.conn.execute(
                "SELECT d.id, d.event_id, d.endpoint FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
                f" WHERE {' AND '.join(clauses)} ORDER BY d.id",
                params,
            ).fetchall()
            for old_id, event_id, name in rows:
                cursor = self.conn.execute(
                    "INSERT INTO webhook_deliveries (event_id, endpoint, attempt, status, next_attempt_at, created_at,"
                    " replay_of) VALUES (?, ?, 0, 'pending', ?, ?, ?)",
                    (event_id, name, now, now, old_id),
                )
                created.append(cursor.lastrowid)
        return created

    def deliveries(self, limit: int = 50, endpoint: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE d.endpoint = ?", [endpoint]) if endpoint else ("", [])
        cursor = self.conn.execute(
            "SELECT d.id, d.event_id, e.type, d.endpoint, d.attempt, d.status, d.response_code, d.next_attempt_at,"
            " d.last_error, d.delivered_at, e.created_at, d.replay_of FROM webhook_deliveries d"
            f" JOIN webhook_events e ON e.id = d.event_id {where} ORDER BY d.id DESC LIMIT ?",
            (*params, limit),
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def prune_webhooks(self, keep_days: float, keep_deliveries: int = 100_000) -> None:
        cutoff = self._iso_days_ago(keep_days)
        with self.transaction():
            self.conn.execute(
                "DELETE FROM webhook_deliveries WHERE status IN ('delivered', 'dead') AND (created_at < ?"
                " OR id <= (SELECT MAX(id) FROM webhook_deliveries) - ?)",
                (cutoff, keep_deliveries),
            )
            self.conn.execute(
                "DELETE FROM webhook_events WHERE created_at < ? AND id NOT IN"
                " (SELECT event_id FROM webhook_deliveries)",
                (cutoff,),
            )


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
