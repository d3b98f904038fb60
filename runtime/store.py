"""The store: the tables every primary, worker (`emit`) and CLI command shares; SQLite by default.

Table names and the columns in DESIGN.md are a contract. `SqlStore` is the one
store interface: each method is one statement or one transaction, written once
in SQL that SQLite and PostgreSQL both run. `Store` is SQLite in WAL mode, one
file on one host; `runtime.pgstore.PgStore` is PostgreSQL, for primaries on
several hosts (`[store] url`). `open_store` picks one. The primary never calls
the store on its event loop: `AsyncStore` runs every call on one thread.

Many processes open one SQLite file (primaries sharing a store, every worker's
`emit`), often at the same moment, so opening is safe under concurrency: the
file is created once, under a lock, readable by its owner only, and the schema
is migrated in one write transaction, numbered by `PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from .config import StoreConfig

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
FILE_MODE = 0o600  # it holds webhook URLs (credentials and all) and every payload
ERROR_HOLD_SECONDS = 300.0  # a replaced store file stays in `status` this long after writes succeed again
URL_SCHEMES = ("postgresql://", "postgres://")
# A run whose primary on another host has not written a heartbeat for this long is abandoned by the next
# primary to start (pids say nothing across hosts); a live primary's heartbeat is a few seconds old.
ABANDON_AFTER = 120.0
FORGET_AFTER = 86_400.0  # heartbeat rows of primaries gone this long are deleted


class StoreError(Exception):
    """The store cannot be opened or written (a server database: is unreachable); the message says why."""


# What a store call may raise when the store, not the caller, is at fault: callers that must outlive an
# unavailable store (the scheduler, the webhook runner, the primary's housekeeping) catch these.
STORE_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.Error, StoreError)


def is_url(where: str | os.PathLike[str]) -> bool:
    """A server database's URL (`postgresql://...`), as opposed to the path of a SQLite file."""
    return isinstance(where, str) and where.startswith(URL_SCHEMES)


def redact_url(url: str) -> str:
    """The URL without its password (in the authority or as a `password=` parameter): what messages show."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = "&".join(
        "password=***" if item.partition("=")[0] == "password" else item for item in parts.query.split("&") if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def store_label(where: str | os.PathLike[str]) -> str:
    """How messages name a store: its path, or its URL without the password."""
    return redact_url(where) if is_url(where) else str(where)


def iso_at(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and a Z, the one format every stored time uses (so strings sort)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    return iso_at(time.time())


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY in any of its extended forms: another connection held the lock longer than we waited."""
    # Errors the sqlite3 module raises itself (a closed connection) carry no code.
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


def connect(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A connection to an existing store file. It never creates one: `Store` does, readable by its owner only."""
    conn = sqlite3.connect(
        f"{path.absolute().as_uri()}?mode=rw",
        uri=True,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        _use_wal(conn, busy_timeout_ms / 1000)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switching a fresh file to WAL needs an exclusive lock, and SQLite does not always wait for it
    (the busy timeout is not honoured in every case): processes opening one new store together got
    "database is locked". So retry, backing off with jitter, for as long as a write would wait."""
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.1)


def _companions(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _create_file(path: Path) -> None:
    """Create the store file private to its owner, or tighten one that other users may read.

    SQLite gives the -wal and -shm files the main file's mode, so they follow it. A -wal or -shm
    without its main file is what a deleted store left behind, possibly still mapped by processes
    writing to the deleted file: a new store must not share them, so its creator removes them. The
    directory lock makes "created it, so the companions are stale" true: no other opener can have
    made this file's companions between our create and our unlink.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            created = False
        else:
            created = True
            for companion in _companions(path):
                companion.unlink(missing_ok=True)
    finally:
        os.close(directory)  # and with it the lock
    if not created:
        for file in (path, *_companions(path)):
            _tighten(file)


def _tighten(path: Path) -> None:
    """Left readable by a version that created files with the umask's mode: make it the owner's only."""
    with contextlib.suppress(FileNotFoundError, PermissionError):  # gone already; or another user's, not ours
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _schema_1(conn: sqlite3.Connection) -> None:
    """The tables and indexes of the first release (IF NOT EXISTS: stores from before versioning have them)."""
    # Imported here, by the one process that migrates: sqlite_utils (with click and pluggy) is most of
    # this module's import time, and every worker that calls emit() imports this module.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
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


def _schema_2(conn: sqlite3.Connection) -> None:
    """Primaries' heartbeats, and the host of each pid stored (a pid names a process on one host only)."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS primaries (host TEXT NOT NULL, pid INTEGER NOT NULL, bind TEXT,"
        " workers_ready INTEGER, version TEXT, started_at TEXT, last_seen TEXT NOT NULL, PRIMARY KEY (host, pid))"
    )
    conn.execute("ALTER TABLE job_runs ADD COLUMN primary_host TEXT")
    conn.execute("ALTER TABLE webhook_deliveries ADD COLUMN leased_host TEXT")


# Migration n brings a store from user_version n - 1 to n. Only ever append: a store at a newer version
# than this code knows is used as it is (blue/green deploys run an older release on the same file).
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_1, _schema_2)
SCHEMA_VERSION = len(_MIGRATIONS)


class Cursor(Protocol):
    """What both drivers' cursors offer and the store's methods use."""

    description: Any
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


def _dicts(cursor: Cursor) -> list[dict[str, Any]]:
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


class SqlStore:
    """The store interface: every method the runtime, `emit` and the CLI call, written once.

    A backend supplies `_execute`, `_executemany` and `transaction` (SQL with `?` placeholders), and
    `label`, the store's name in messages. `clock` (seconds since the epoch) stamps and ages every
    row, so tests can pin "now". `host` goes with every pid this store writes: leases and running
    jobs are taken back by a primary on the same host only, where a pid can be checked.
    """

    label: str
    # Appended to the query that picks deliveries to lease: a server database locks the rows it picks
    # and passes over those another primary is picking (SQLite has one writer at a time anyway).
    _SKIP_LOCKED = ""
    # Run inside a claim's transaction with the job's name: serialises claims of one job, as SQLite's
    # single writer does, so overlap = skip sees every run another primary started.
    _JOB_LOCK: str | None = None

    def __init__(self, clock: Callable[[], float], busy_timeout_ms: int) -> None:
        self.clock = clock
        self.busy_timeout_ms = busy_timeout_ms
        self.host = socket.gethostname()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def set_busy_timeout(self, busy_timeout_ms: int) -> None:
        """How long one call may wait (for a lock, or the server) before it fails."""
        raise NotImplementedError

    def file_problem(self) -> str | None:
        """Why the store is not the file at its path any more (SQLite); None for a server database."""
        return None

    def reopen(self, prepare: bool = True) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _now(self) -> str:
        return iso_at(self.clock())

    def _iso_in(self, seconds: float) -> str:
        return iso_at(self.clock() + seconds)

    def _iso_days_ago(self, days: float) -> str:
        return iso_at(self.clock() - days * 86400)

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
        self._execute(
            "INSERT INTO worker_events (ts, worker_id, pid, event, exit_code, reason, primary_pid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self._now(), worker_id, pid, event, exit_code, reason, primary_pid),
        )

    def worker_events(self, limit: int = 100) -> list[dict[str, Any]]:
        return _dicts(
            self._execute(
                "SELECT ts, worker_id, pid, event, exit_code, reason FROM worker_events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        )

    def prune_worker_events(self, keep: int = 10_000, keep_days: float = 30.0) -> None:
        cutoff = self._iso_days_ago(keep_days)
        self._execute(
            "DELETE FROM worker_events WHERE ts < ? OR id <= (SELECT MAX(id) FROM worker_events) - ?",
            (cutoff, keep),
        )

    # jobs

    def claim_slot(
        self,
        job: str,
        scheduled_for: str,
        trigger: str,
        primary_pid: int,
        overlap: str = "allow",
        finished: Collection[int] = (),
    ) -> tuple[str, int | None, list[int]]:
        """Claim one slot of a job: an insert under UNIQUE(job, scheduled_for), in one write transaction.

        Returns ("claimed", run_id, running_ids), ("skipped", run_id, running_ids) when overlap is
        "skip" and a run of the job is still going (on any primary), or ("lost", None, []) when
        another primary claimed the slot first. `running_ids` are the runs a "replace" must end.
        `finished` are runs the caller knows have ended although their rows, not yet rewritten
        (the store refused the write), still say `running`: they do not count as running.
        """
        now = self._now()
        with self.transaction():
            if self._JOB_LOCK is not None:
                self._execute(self._JOB_LOCK, (job,))
            running = [
                row[0]
                for row in self._execute(
                    "SELECT id FROM job_runs WHERE job = ? AND status = 'running' ORDER BY id", (job,)
                ).fetchall()
                if row[0] not in finished
            ]
            skip = overlap == "skip" and bool(running)
            claimed = self._execute(
                "INSERT INTO job_runs (job, scheduled_for, trigger, started_at, finished_at, status, output,"
                " attempt, primary_pid, primary_host) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (job, scheduled_for) DO NOTHING RETURNING id",
                (
                    job,
                    scheduled_for,
                    trigger,
                    now,
                    now if skip else None,
                    "skipped" if skip else "running",
                    f"skipped: run {running[0]} of this job was still running (overlap = skip)" if skip else "",
                    primary_pid,
                    self.host,
                ),
            ).fetchone()
            if claimed is not None and trigger != "manual":
                self.mark_slot(job, scheduled_for)
        if claimed is None:
            return "lost", None, []
        return ("skipped" if skip else "claimed"), claimed[0], running

    def record_skipped(self, job: str, scheduled_for: str, trigger: str, reason: str, primary_pid: int) -> bool:
        """A slot that will not run, and why; False if the slot already has a row."""
        now = self._now()
        with self.transaction():
            recorded = self._execute(
                "INSERT INTO job_runs (job, scheduled_for, trigger, started_at, finished_at, status, output, attempt,"
                " primary_pid, primary_host) VALUES (?, ?, ?, ?, ?, 'skipped', ?, 0, ?, ?)"
                " ON CONFLICT (job, scheduled_for) DO NOTHING RETURNING id",
                (job, scheduled_for, trigger, now, now, reason, primary_pid, self.host),
            ).fetchone()
            self.mark_slot(job, scheduled_for)
        return recorded is not None

    def mark_slot(self, job: str, scheduled_for: str) -> None:
        """Remember the newest slot this job has seen, so catch-up knows where to resume."""
        self._execute(
            "INSERT INTO job_state (job, paused, last_slot, updated_at) VALUES (?, 0, ?, ?)"
            " ON CONFLICT (job) DO UPDATE SET last_slot = CASE WHEN excluded.last_slot >"
            " COALESCE(job_state.last_slot, '') THEN excluded.last_slot ELSE job_state.last_slot END",
            (job, scheduled_for, self._now()),
        )

    def last_slot(self, job: str) -> str | None:
        row = self._execute("SELECT last_slot FROM job_state WHERE job = ?", (job,)).fetchone()
        return row[0] if row else None

    def begin_attempt(self, run_id: int, attempt: int) -> None:
        self._execute(
            "UPDATE job_runs SET attempt = ?, status = 'running', finished_at = NULL WHERE id = ?", (attempt, run_id)
        )

    def finish_attempt(
        self, run_id: int, attempt: int, started_at: str, status: str, exit_code: int | None, output: str, final: bool
    ) -> None:
        now = self._now()
        with self.transaction():
            self._execute(
                "INSERT INTO job_attempts (run_id, attempt, started_at, finished_at, status, exit_code, output)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, attempt, started_at, now, status, exit_code, output),
            )
            self._execute(
                "UPDATE job_runs SET status = ?, exit_code = ?, output = ?, finished_at = ? WHERE id = ?",
                (status if final else "running", exit_code, output, now if final else None, run_id),
            )

    def abandon_runs(self, alive: Callable[[int], bool], reason: str) -> list[int]:
        """Mark `running` rows whose primary is gone as `abandoned`: on this host, its pid is not alive;
        on another, it has written no heartbeat for ABANDON_AFTER seconds."""
        rows = self._execute("SELECT id, primary_pid, primary_host FROM job_runs WHERE status = 'running'").fetchall()
        heard = {
            (host, pid)
            for host, pid in self._execute(
                "SELECT host, pid FROM primaries WHERE last_seen >= ?", (self._iso_in(-ABANDON_AFTER),)
            ).fetchall()
        }
        dead = [
            run_id
            for run_id, pid, host in rows
            if pid is None or (not alive(pid) if host in (None, self.host) else (host, pid) not in heard)
        ]
        for run_id in dead:
            self._execute(
                "UPDATE job_runs SET status = 'abandoned', finished_at = ?, output = COALESCE(output, '') || ?"
                " WHERE id = ?",
                (self._now(), reason, run_id),
            )
        return dead

    def set_paused(self, job: str, paused: bool) -> None:
        self._execute(
            "INSERT INTO job_state (job, paused, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (job) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at",
            (job, int(paused), self._now()),
        )

    def paused_jobs(self) -> set[str]:
        return {row[0] for row in self._execute("SELECT job FROM job_state WHERE paused = 1").fetchall()}

    def last_statuses(self) -> dict[str, str]:
        rows = self._execute(
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
        return _dicts(
            self._execute(
                "SELECT id, job, scheduled_for, trigger, started_at, finished_at, status, exit_code, output, attempt"
                f" FROM job_runs {where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            )
        )

    def job_run(self, run_id: int) -> dict[str, Any] | None:
        """One `job_runs` row, every column."""
        rows = _dicts(self._execute("SELECT * FROM job_runs WHERE id = ?", (run_id,)))
        return rows[0] if rows else None

    def prune_job_runs(self, keep_runs: int, keep_days: float) -> int:
        cutoff = self._iso_days_ago(keep_days)
        with self.transaction():
            cursor = self._execute(
                "DELETE FROM job_runs WHERE status != 'running' AND (scheduled_for < ? OR id IN ("
                " SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY job ORDER BY id DESC) AS n"
                " FROM job_runs) AS ranked WHERE n > ?))",
                (cutoff, keep_runs),
            )
            self._execute("DELETE FROM job_attempts WHERE run_id NOT IN (SELECT id FROM job_runs)")
        return cursor.rowcount

    # primaries

    def heartbeat(self, pid: int, bind: str, workers_ready: int, version: str, started_at: str) -> None:
        """This primary is alive: its row, stamped now (and rows of primaries long gone deleted)."""
        with self.transaction():
            self._execute(
                "INSERT INTO primaries (host, pid, bind, workers_ready, version, started_at, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host, pid) DO UPDATE SET bind = excluded.bind,"
                " workers_ready = excluded.workers_ready, version = excluded.version,"
                " started_at = excluded.started_at, last_seen = excluded.last_seen",
                (self.host, pid, bind, workers_ready, version, started_at, self._now()),
            )
            self._execute("DELETE FROM primaries WHERE last_seen < ?", (self._iso_in(-FORGET_AFTER),))

    def live_primaries(self, within: float) -> list[dict[str, Any]]:
        """Primaries whose last heartbeat is at most `within` seconds old."""
        return _dicts(
            self._execute(
                "SELECT host, pid, bind, workers_ready, version, started_at, last_seen FROM primaries"
                " WHERE last_seen >= ? ORDER BY host, pid",
                (self._iso_in(-within),),
            )
        )

    def forget_primary(self, pid: int) -> None:
        """A primary that stops says so at once, rather than waiting to age out of `live_primaries`."""
        self._execute("DELETE FROM primaries WHERE host = ? AND pid = ?", (self.host, pid))

    # webhooks

    def webhook_counts(self) -> dict[str, int]:
        """pending (not yet tried), failed (last attempt failed: retrying or dead), delivered, and dead alone."""
        counts = dict(self._execute("SELECT status, COUNT(*) FROM webhook_deliveries GROUP BY status").fetchall())
        return {
            "pending": counts.get("pending", 0),
            "failed": counts.get("failed", 0) + counts.get("dead", 0),
            "delivered": counts.get("delivered", 0),
            "dead": counts.get("dead", 0),
        }

    def endpoint_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for endpoint, status, count in self._execute(
            "SELECT endpoint, status, COUNT(*) FROM webhook_deliveries GROUP BY endpoint, status"
        ).fetchall():
            counts.setdefault(endpoint, {})[status] = count
        return counts

    def sync_endpoints(self, endpoints: list[dict[str, Any]]) -> None:
        """Publish the configured endpoints (never their secrets) for `emit()` in any process to fan out to."""
        with self.transaction():
            self._write_endpoints(endpoints, self._execute)

    @staticmethod
    def _write_endpoints(endpoints: list[dict[str, Any]], execute: Callable[..., Any]) -> None:
        """Inside a transaction: every endpoint not in `endpoints` is disabled, those in it are (re)enabled."""
        execute("UPDATE webhook_endpoints SET enabled = 0, disabled_reason = 'removed from the config'")
        for e in endpoints:
            execute(
                "INSERT INTO webhook_endpoints (name, url, events, max_attempts, enabled, disabled_reason)"
                " VALUES (?, ?, ?, ?, 1, NULL) ON CONFLICT (name) DO UPDATE SET url = excluded.url,"
                " events = excluded.events, max_attempts = excluded.max_attempts, enabled = 1,"
                " disabled_reason = NULL",
                (e["name"], e["url"], json.dumps(e["events"]), e["max_attempts"]),
            )

    def disable_endpoint(self, name: str, reason: str) -> None:
        self._execute("UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ? WHERE name = ?", (reason, name))

    def kill_queue(self, endpoint: str, reason: str) -> int:
        """Every queued delivery of a disabled endpoint becomes dead (replayable), with the reason."""
        return self._execute(
            "UPDATE webhook_deliveries SET status = 'dead', last_error = ?, leased_by = NULL, leased_host = NULL,"
            " lease_until = NULL WHERE endpoint = ? AND status IN ('pending', 'failed')",
            (reason, endpoint),
        ).rowcount

    def endpoints(self) -> list[dict[str, Any]]:
        cursor = self._execute(
            "SELECT name, url, events, max_attempts, enabled, disabled_reason FROM webhook_endpoints ORDER BY name"
        )
        return [
            {
                "name": name,
                "url": url,
                "events": json.loads(events),
                "max_attempts": max_attempts,
                "enabled": bool(enabled),
                "disabled_reason": reason,
            }
            for name, url, events, max_attempts, enabled, reason in cursor.fetchall()
        ]

    def emit(self, event_id: str, kind: str, payload: str, endpoints: list[str]) -> None:
        """The event and one pending delivery per matching endpoint, in one transaction."""
        now = self._now()
        with self.transaction():
            self._execute(
                "INSERT INTO webhook_events (id, type, payload, created_at) VALUES (?, ?, ?, ?)",
                (event_id, kind, payload, now),
            )
            self._executemany(
                "INSERT INTO webhook_deliveries (event_id, endpoint, attempt, status, next_attempt_at, created_at)"
                " VALUES (?, ?, 0, 'pending', ?, ?)",
                [(event_id, name, now, now) for name in endpoints],
            )

    def lease_deliveries(self, endpoint: str, owner: int, limit: int, lease_seconds: float) -> list[dict[str, Any]]:
        """Take up to `limit` due deliveries of one endpoint for `owner` (a primary's pid) for a while.

        Any primary may take any due delivery whose lease has run out: a dead primary's leases pass
        to the others after `lease_seconds`.
        """
        now = self._now()
        until = self._iso_in(lease_seconds)
        with self.transaction():
            rows = self._execute(
                "SELECT d.id, d.event_id, d.attempt, e.type, e.payload, e.created_at FROM webhook_deliveries d"
                " JOIN webhook_events e ON e.id = d.event_id"
                " WHERE d.endpoint = ? AND d.status IN ('pending', 'failed') AND d.next_attempt_at <= ?"
                " AND (d.lease_until IS NULL OR d.lease_until < ?) ORDER BY d.next_attempt_at, d.id LIMIT ?"
                + self._SKIP_LOCKED,
                (endpoint, now, now, limit),
            ).fetchall()
            self._executemany(
                "UPDATE webhook_deliveries SET leased_by = ?, leased_host = ?, lease_until = ? WHERE id = ?",
                [(owner, self.host, until, row[0]) for row in rows],
            )
        keys = ("id", "event_id", "attempt", "type", "payload", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def release_leases(self, alive: Callable[[int], bool]) -> int:
        """Leases held by primaries on this host that died go back to the queue at once (those of
        another host's primaries run out instead: their pids cannot be checked from here)."""
        mine = "leased_by IS NOT NULL AND COALESCE(leased_host, ?) = ? AND status IN ('pending', 'failed')"
        owners = [
            row[0]
            for row in self._execute(
                f"SELECT DISTINCT leased_by FROM webhook_deliveries WHERE {mine}", (self.host, self.host)
            ).fetchall()
        ]
        released = 0
        for owner in owners:
            if not alive(owner):
                released += self._execute(
                    "UPDATE webhook_deliveries SET leased_by = NULL, leased_host = NULL, lease_until = NULL"
                    f" WHERE {mine} AND leased_by = ?",
                    (self.host, self.host, owner),
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
        self._execute(
            "UPDATE webhook_deliveries SET attempt = ?, status = ?, response_code = ?, last_error = ?,"
            " next_attempt_at = ?, delivered_at = ?, leased_by = NULL, leased_host = NULL, lease_until = NULL"
            " WHERE id = ?",
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
            rows = self._execute(
                "SELECT d.id, d.event_id, d.endpoint FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
                f" WHERE {' AND '.join(clauses)} ORDER BY d.id",
                params,
            ).fetchall()
            for old_id, event_id, name in rows:
                row = self._execute(
                    "INSERT INTO webhook_deliveries (event_id, endpoint, attempt, status, next_attempt_at, created_at,"
                    " replay_of) VALUES (?, ?, 0, 'pending', ?, ?, ?) RETURNING id",
                    (event_id, name, now, now, old_id),
                ).fetchone()
                created.append(row[0])
        return created

    def deliveries(self, limit: int = 50, endpoint: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE d.endpoint = ?", [endpoint]) if endpoint else ("", [])
        return _dicts(
            self._execute(
                "SELECT d.id, d.event_id, e.type, d.endpoint, d.attempt, d.status, d.response_code,"
                " d.next_attempt_at, d.last_error, d.delivered_at, e.created_at, d.replay_of FROM webhook_deliveries d"
                f" JOIN webhook_events e ON e.id = d.event_id {where} ORDER BY d.id DESC LIMIT ?",
                (*params, limit),
            )
        )

    def prune_webhooks(self, keep_days: float, keep_deliveries: int = 100_000) -> None:
        cutoff = self._iso_days_ago(keep_days)
        with self.transaction():
            self._execute(
                "DELETE FROM webhook_deliveries WHERE status IN ('delivered', 'dead') AND (created_at < ?"
                " OR id <= (SELECT MAX(id) FROM webhook_deliveries) - ?)",
                (cutoff, keep_deliveries),
            )
            self._execute(
                "DELETE FROM webhook_events WHERE created_at < ? AND id NOT IN"
                " (SELECT event_id FROM webhook_deliveries)",
                (cutoff,),
            )


class Store(SqlStore):
    """The SQLite store: one file, WAL, shared by every process of the primaries on one host.

    `busy_timeout_ms` is how long a write waits for another connection's lock before it fails.
    `prepare=False` (an emitter) opens only a file whose schema is already there, as `reopen` does.
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        prepare: bool = True,
    ) -> None:
        super().__init__(clock, busy_timeout_ms)
        self.path = path
        self.label = str(path)
        # The endpoints this process published, so that a store file recreated under it has them again.
        self._published: list[dict[str, Any]] | None = None
        self.conn, self._file = self._open(prepare)

    def _open(self, prepare: bool) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """Connect to the file at `path`; `prepare` creates it if need be and migrates it, otherwise it
        must be ready (its schema current)."""
        try:
            if prepare:
                _create_file(self.path)
            # Before connecting: were the file swapped in between, `file_problem` would see it and we would
            # reopen, rather than trust a file we are not connected to.
            info = os.stat(self.path)
            conn = connect(self.path, self.busy_timeout_ms)
            try:
                if prepare:
                    self._migrate(conn)
                elif _schema_version(conn) < SCHEMA_VERSION:
                    raise StoreError(f"store file {self.path} is new and its schema is not created yet")
            except BaseException:
                conn.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {self.path}: {_reason(exc)}") from None
        return conn, (info.st_dev, info.st_ino)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """One write transaction, so openers racing on a fresh file create the schema once; a process that
        published endpoints writes them in the same transaction, so no emitter sees the file without them."""
        if self._published is None and _schema_version(conn) >= SCHEMA_VERSION:
            return  # only a read: opening an up-to-date store never waits for a writer
        with _transaction(conn):
            version = _schema_version(conn)
            for number, migration in enumerate(_MIGRATIONS[version:], start=version + 1):
                migration(conn)
                conn.execute(f"PRAGMA user_version = {number}")
            if self._published is not None:
                self._write_endpoints(self._published, conn.execute)

    def file_problem(self) -> str | None:
        """Why the file at `path` is not the one this store writes to, or None while it is.

        SQLite goes on writing to a deleted (or renamed-over) file without a complaint, and all of
        it is lost: whoever holds a Store asks this now and then and `reopen`s.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return f"store file {self.path} was deleted while in use"
        if (info.st_dev, info.st_ino) != self._file:
            return f"store file {self.path} was replaced by another file while in use"
        return None

    def reopen(self, prepare: bool = True) -> None:
        """Move to the file now at `path`. With `prepare` (the primary), create a new one if there is
        none, migrate it and publish this process's endpoints in it. Without (an emitter), only move to
        a file that is ready: one whose schema, and so its endpoints, the primary has written.

        Closing the old connection is safe: SQLite neither checkpoints into nor deletes the -wal of a
        database file that has moved, so the new file's -wal at the same path is left alone.
        """
        conn, self._file = self._open(prepare)
        old, self.conn = self.conn, conn
        old.close()

    def set_busy_timeout(self, busy_timeout_ms: int) -> None:
        if busy_timeout_ms != self.busy_timeout_ms:
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.busy_timeout_ms = busy_timeout_ms

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return _transaction(self.conn)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, params)

    def _executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    def sync_endpoints(self, endpoints: list[dict[str, Any]]) -> None:
        super().sync_endpoints(endpoints)
        self._published = list(endpoints)


def open_store_url(
    where: str | os.PathLike[str],
    clock: Callable[[], float] = time.time,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    prepare: bool = True,
) -> SqlStore:
    """The store at `where`: PostgreSQL for a `postgresql://` URL, else the SQLite file at that path.

    `prepare` (the primary) creates and migrates the schema; without it (an emitter, the CLI) the
    schema must be there already. StoreError says why a store cannot be opened.
    """
    if is_url(where):
        try:
            from .pgstore import PgStore
        except ImportError:
            raise StoreError(
                f"store {store_label(where)} needs psycopg: pip install 'clusterctl-tui[postgres]'"
            ) from None
        return PgStore(str(where), clock=clock, busy_timeout_ms=busy_timeout_ms, prepare=prepare)
    return Store(Path(where), clock=clock, busy_timeout_ms=busy_timeout_ms, prepare=prepare)


def open_store(config: StoreConfig, prepare: bool = True) -> SqlStore:
    """The store `[store]` names: its `url` when set, else the SQLite file at its `path`."""
    return open_store_url(config.url or config.path, prepare=prepare)


class AsyncStore:
    """The primary's handle: every call runs on one thread, off the event loop."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clusterctl-store")
        self.last_error: str | None = None
        self._held: tuple[str, float] | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Fire and forget; a failure (disk full, read-only, unreachable) is kept in `last_error`, never raised."""

        def run() -> None:
            try:
                fn(*args, **kwargs)
                self.last_error = self._still_held()
            except STORE_ERRORS as exc:
                self.last_error = f"store {self.store.label}: {_reason(exc)}"

        self._executor.submit(run)

    def report(self, message: str, hold: float = ERROR_HOLD_SECONDS) -> None:
        """An error that stays in `last_error` for `hold` seconds even while writes succeed: one the
        operator must see although the store works again (its file was replaced, history is gone)."""
        self.last_error = message
        self._held = (message, time.monotonic() + hold)

    def wrote(self) -> None:
        """A write went through: what the store refused before is over (held reports stay)."""
        self.last_error = self._still_held()

    def _still_held(self) -> str | None:
        if self._held is not None and time.monotonic() < self._held[1]:
            return self._held[0]
        return None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileExistsError):
        return f"{exc.filename} is not a directory"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
