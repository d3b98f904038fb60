"""Immutable snapshots of the cluster: what the console renders and `status --json` prints."""

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
    jobs: tuple[dict[str, Any], ...] = ()
    endpoints: tuple[dict[str, Any], ...] = ()
    webhooks: dict[str, int] = field(default_factory=lambda: {"pending": 0, "failed": 0, "delivered": 0})
    store_error: str | None = None
    started_at: str = ""

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
            "jobs": list(self.jobs),
            "webhooks": dict(self.webhooks),
            "store_error": self.store_error,
        }
