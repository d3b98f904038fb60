"""A fixed cluster state: the console rendered the same way every time, for screenshots and snapshot tests.

`SampleBackend` offers what the console needs of `runtime.Primary`
(`console.app.Backend`) from constant data, and records the actions it is
asked for instead of acting.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from runtime import ClusterSnapshot, EventBus, Settings, WorkerSnapshot
from runtime.control import ControlError
from runtime.events import Event
from runtime.logs import LogLine
from runtime.snapshot import Delivery, EndpointSnapshot, JobRun, JobSnapshot, PrimaryRow, ReloadSnapshot
from runtime.wire import encode

NOW = datetime(2026, 11, 22, 9, 30, 0, tzinfo=UTC)
T0 = NOW.timestamp()


def _wave(seed: int, points: int = 60, base: float = 120.0) -> tuple[float, ...]:
    return tuple(
        round(base + 40 * math.sin((i + seed * 7) / 6) + 15 * math.sin(i / 2 + seed), 1) for i in range(points)
    )


def _worker(slot: int, **overrides: Any) -> WorkerSnapshot:
    values: dict[str, Any] = {
        "id": slot,
        "pid": 41200 + slot * 7,
        "state": "ready",
        "generation": 3,
        "cpu_percent": round(11.5 + slot * 1.7, 1),
        "rss_bytes": (52 + slot * 3) * 1024 * 1024,
        "requests_total": 18_000 + slot * 911,
        "requests_per_second": round(118.0 + slot * 4.25, 1),
        "p50_ms": round(1.2 + slot * 0.05, 2),
        "p99_ms": round(8.4 + slot * 0.9, 1),
        "restarts": 0,
        "uptime_seconds": 4_000 + slot * 37,
        "in_flight": slot % 3,
        "connections": 8,
        "rps_history": _wave(slot),
    }
    values.update(overrides)
    return WorkerSnapshot(**values)


WORKERS = (
    _worker(1),
    _worker(2),
    _worker(3, restarts=2, last_exit="killed by SIGKILL", uptime_seconds=312),
    _worker(4),
    _worker(
        5,
        state="backoff",
        pid=None,
        restarts=5,
        requests_per_second=0.0,
        cpu_percent=0.0,
        rss_bytes=0,
        p50_ms=0.0,
        p99_ms=0.0,
        uptime_seconds=0,
        backoff_seconds=8.0,
        last_exit="exit code 3",
        rps_history=(),
    ),
    _worker(6),
    _worker(
        7,
        state="starting",
        pid=41299,
        generation=4,
        requests_per_second=0.0,
        uptime_seconds=1,
        requests_total=0,
        p50_ms=0.0,
        p99_ms=0.0,
        rps_history=(),
    ),
    _worker(8),
)

JOBS = (
    JobSnapshot(
        name="cleanup",
        schedule="*/5 * * * *",
        timezone="UTC",
        next_run="2026-11-22T09:35:00.000Z",
        last_status="succeeded",
        paused=False,
        running=0,
    ),
    JobSnapshot(
        name="nightly-report",
        schedule="30 1 * * *",
        timezone="America/New_York",
        next_run="2026-11-23T06:30:00.000Z",
        last_status="failed",
        paused=False,
        running=0,
    ),
    JobSnapshot(
        name="sync-ledger",
        schedule="*/10 * * * * *",
        timezone="UTC",
        next_run=None,
        last_status="skipped",
        paused=True,
        running=0,
    ),
)


def _run(i: int, job: str, trigger: str, status: str, code: int | None, attempt: int) -> JobRun:
    slot = f"2026-11-22T09:{29 - i * 5 % 30:02d}"
    return JobRun(
        id=912 - i,
        job=job,
        scheduled_for=f"{slot}:00.000Z",
        trigger=trigger,
        started_at=f"{slot}:00.004Z",
        finished_at=f"{slot}:00.004Z" if status == "skipped" else f"{slot}:02.310Z",
        status=status,
        exit_code=code,
        output=f"cleaned {120 - i} expired sessions\nvacuumed in 0.{i}s"
        if status == "succeeded"
        else 'Traceback (most recent call last):\n  File "report.py", line 41, in main\nConnectionError: smtp refused',
        attempt=attempt,
    )


RUNS = [
    _run(i, *run)
    for i, run in enumerate(
        [
            ("cleanup", "schedule", "succeeded", 0, 1),
            ("nightly-report", "manual", "failed", 1, 3),
            ("cleanup", "schedule", "succeeded", 0, 1),
            ("cleanup", "catch_up", "succeeded", 0, 1),
            ("sync-ledger", "schedule", "skipped", None, 1),
            ("cleanup", "schedule", "succeeded", 0, 1),
        ]
    )
]

ENDPOINTS = (
    EndpointSnapshot(
        name="ops",
        url="https://hooks.example.com/clusterctl",
        enabled=True,
        in_flight=1,
        delivered=1204,
        failed=3,
        last_error=None,
    ),
    EndpointSnapshot(
        name="billing",
        url="https://billing.example.com/events",
        enabled=False,
        in_flight=0,
        delivered=88,
        failed=9,
        last_error="HTTP 410: gone",
    ),
)
QUEUES = {"ops": {"delivered": 1204, "pending": 2, "failed": 1, "dead": 1}, "billing": {"delivered": 88, "dead": 9}}
DELIVERIES = [
    Delivery(
        id=5120 - i,
        event_id=f"msg_18ea5a0f21e7{i:04d}",
        type=kind,
        endpoint=endpoint,
        attempt=attempt,
        status=status,
        response_code=code,
        next_attempt_at=None,
        last_error=error,
        delivered_at=None,
        created_at="2026-11-22T09:29:12.000Z",
        replay_of=None,
    )
    for i, (kind, endpoint, status, attempt, code, error) in enumerate(
        [
            ("app.order_created", "ops", "delivered", 1, 204, None),
            ("worker.crashed", "ops", "delivered", 1, 200, None),
            ("job.failed", "ops", "failed", 2, 503, "HTTP 503: upstream busy"),
            ("app.order_created", "billing", "dead", 1, 410, "410 Gone: the receiver asked us to stop"),
            ("cluster.scaled", "ops", "dead", 8, None, "ConnectError: connection refused"),
            ("app.order_created", "ops", "delivered", 1, 204, None),
        ]
    )
]

PRIMARIES = tuple(
    PrimaryRow(host, pid, bind, ready, "0.1.0", "2026-11-22T08:12:40.000Z", "2026-11-22T09:29:59.000Z")
    for host, pid, bind, ready in [
        ("web-1", 41200, "127.0.0.1:8000", 6),
        ("web-2", 3321, "10.0.0.12:8000", 4),
        ("web-3", 918, "10.0.0.13:8000", 4),
    ]
)

EVENTS = [
    ("cluster.started", "serving shop.main:app on 127.0.0.1:8000 with 8 workers", None, None),
    ("cluster.scaled", "scaled from 6 to 8 workers", None, None),
    ("worker.crashed", "killed: killed by operator", 3, 41221),
    ("worker.spawned", "spawned (generation 3)", 3, 41221),
    ("job.failed", "nightly-report 2026-11-22T06:30:00.000Z (manual): failed, exit code 1", None, None),
    ("worker.crashed", "crashed: exit code 3", 5, 41240),
    ("cluster.reload_started", "rolling restart to generation 4", None, None),
]

TAIL = [
    LogLine(3, 41221, "err", "INFO:     shop.main: cache warmed (1834 keys)"),
    LogLine(3, 41221, "out", "payment provider: using sandbox"),
    LogLine(3, 41221, "err", "WARNING:  slow query: SELECT * FROM orders (412 ms)"),
    LogLine(3, 41221, "err", "INFO:     ready"),
]


class SampleBackend:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.events = EventBus()
        self.actions: list[tuple[Any, ...]] = []
        self.desired = 8
        self.running = True
        for offset, (kind, message, worker_id, pid) in enumerate(EVENTS):
            self.events.recent.append(Event(kind, message, worker_id, pid, {}, T0 - 600 + offset * 37))

    async def start(self) -> None:
        return None

    async def wait(self) -> None:
        return None

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            pid=41200,
            bind="127.0.0.1:8000",
            desired_workers=self.desired,
            generation=3,
            workers=WORKERS,
            requests_per_second=round(sum(w.requests_per_second for w in WORKERS), 1),
            p50_ms=1.4,
            p99_ms=12.6,
            error_rate=0.0031,
            cpu_percent=round(sum(w.cpu_percent for w in WORKERS), 1),
            rss_bytes=sum(w.rss_bytes for w in WORKERS),
            primary_cpu_percent=1.2,
            primary_rss_bytes=61 * 1024 * 1024,
            rps_history=tuple(round(s * 6, 1) for s in _wave(0, 120, 130)),
            reload=ReloadSnapshot(generation=4, total=8, done=3, state="running"),
            jobs=JOBS,
            endpoints=ENDPOINTS,
            webhooks={"pending": 2, "failed": 11, "delivered": 1292, "dead": 10},
            started_at="2026-11-22T08:12:40.000Z",
            primaries=PRIMARIES,
        )

    async def call(self, command: str, **args: Any) -> Any:
        """The runtime's commands, answered from the fixed state; actions are recorded for tests."""
        if command == "runs":
            job, status, limit = args.get("job"), args.get("status"), args.get("limit") or 100
            return encode([r for r in RUNS if job in (None, r.job) and status in (None, r.status)][:limit])
        if command == "deliveries":
            return encode(DELIVERIES[: args.get("limit") or 100])
        if command == "queues":
            return QUEUES
        if command == "scale":
            delta = args.get("delta") or 0
            if self.desired + delta < 1:
                raise ControlError("the cluster needs at least 1 worker")
            self.desired += delta
            self.actions.append(("scale", delta))
            return {"desired_workers": self.desired}
        self.actions.append((command, *args.values()))
        results = {
            "reload": {"generation": 4},
            "kill": {"worker": args.get("worker"), "pid": 41207},
            "run-job": {"job": args.get("job"), "run_id": 913},
            "pause-job": {"job": args.get("job"), "paused": True},
            "resume-job": {"job": args.get("job"), "paused": False},
            "replay": {"delivery": args.get("delivery"), "ids": [5121]},
            "stop": {"stopping": True, "pid": 41200},
        }
        return results[command]

    def worker_tail(self, worker_id: int, limit: int = 20) -> list[LogLine]:
        return [line for line in TAIL if line.worker_id == worker_id][-limit:]

    def subscribe_logs(self, callback: Any) -> Any:
        return lambda: None
