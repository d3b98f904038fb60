"""Immutable snapshots of the cluster: what the console renders and `status --json` prints.

Also the records the console reads from the store (job runs, webhook deliveries).
Every field is a JSON value, a tuple of them, a `dict[str, int]` or another of these records,
so the same types cross a process boundary unchanged (`runtime.wire`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSnapshot:
    id: int
    pid: int | None
    state: str  # starting | ready | draining | backoff
    generation: int
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    requests_total: int = 0
    requests_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    restarts: int = 0
    uptime_seconds: float = 0.0
    in_flight: int = 0
    connections: int = 0
    errors_5xx: int = 0
    backoff_seconds: float = 0.0
    last_exit: str | None = None
    rps_history: tuple[float, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ReloadSnapshot:
    generation: int
    total: int
    done: int
    state: str  # running | succeeded | failed
    error: str | None = None


@dataclass(frozen=True)
class JobSnapshot:
    """A configured job as the scheduler holds it now."""

    name: str
    schedule: str
    timezone: str
    next_run: str | None  # ISO-8601 UTC; None while paused or not yet known
    last_status: str | None
    paused: bool
    running: int  # runs in flight


@dataclass(frozen=True)
class EndpointSnapshot:
    """A webhook endpoint as this primary's delivery loop sees it (counts since the primary started)."""

    name: str
    url: str
    enabled: bool  # False once the receiver answered 410 Gone
    in_flight: int
    delivered: int
    failed: int
    last_error: str | None


@dataclass(frozen=True)
class PrimaryRow:
    """A live primary on this store (this one too), from its heartbeat row in `primaries`."""

    host: str
    pid: int
    bind: str
    workers_ready: int
    version: str
    started_at: str
    last_seen: str  # ISO-8601 UTC


@dataclass(frozen=True)
class JobRun:
    """A `job_runs` row (DESIGN.md: Store)."""

    id: int
    job: str
    scheduled_for: str
    trigger: str  # schedule | manual | catch_up
    started_at: str
    finished_at: str | None
    status: str  # running | succeeded | failed | timed_out | skipped | abandoned
    exit_code: int | None
    output: str  # the tail
    attempt: int


@dataclass(frozen=True)
class Delivery:
    """A `webhook_deliveries` row with its event's type and creation time."""

    id: int
    event_id: str  # the webhook-id, the same on every attempt and replay
    type: str
    endpoint: str
    attempt: int
    status: str  # pending | delivered | failed | dead
    response_code: int | None
    next_attempt_at: str | None
    last_error: str | None
    delivered_at: str | None
    created_at: str
    replay_of: int | None  # the delivery this one replays


@dataclass(frozen=True)
class ClusterSnapshot:
    pid: int
    bind: str
    desired_workers: int
    generation: int
    workers: tuple[WorkerSnapshot, ...]
    requests_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    error_rate: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    primary_cpu_percent: float = 0.0
    primary_rss_bytes: int = 0
    rps_history: tuple[float, ...] = field(default=(), repr=False)
    reload: ReloadSnapshot | None = None
    jobs: tuple[JobSnapshot, ...] = ()
    endpoints: tuple[EndpointSnapshot, ...] = ()
    webhooks: dict[str, int] = field(default_factory=lambda: {"pending": 0, "failed": 0, "delivered": 0})
    store_error: str | None = None
    started_at: str = ""
    primaries: tuple[PrimaryRow, ...] = ()  # as last read from the store: every live primary sharing it

    def to_status(self) -> dict[str, Any]:
        """The `status --json` object (DESIGN.md); extend, never rename."""
        workers = []
        for worker in self.workers:
            row = asdict(worker)
            row.pop("rps_history")
            workers.append(row)
        return {
            "primary": {
                "pid": self.pid,
                "bind": self.bind,
                "started_at": self.started_at,
                "cpu_percent": self.primary_cpu_percent,
                "rss_bytes": self.primary_rss_bytes,
            },
            "desired_workers": self.desired_workers,
            "generation": self.generation,
            "workers": workers,
            "totals": {
                "requests_per_second": self.requests_per_second,
                "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms,
                "error_rate": self.error_rate,
                "cpu_percent": self.cpu_percent,
                "rss_bytes": self.rss_bytes,
            },
            "reload": asdict(self.reload) if self.reload else None,
            "jobs": [asdict(job) for job in self.jobs],
            "webhooks": dict(self.webhooks),
            "store_error": self.store_error,
            "primaries": [asdict(primary) for primary in self.primaries],
        }
