"""The Prometheus exporter: `/metrics` for `[metrics] bind`, served from a thread, never from the loop.

The primary's loop publishes what the exporter needs, once a second, as an immutable `MetricsView`
(and the loop-lag probe its readings four times a second); the HTTP thread turns the newest view into
metric families on each scrape and reads nothing else. A scrape costs the supervising loop nothing,
and a blocked loop still answers scrapes, with the lag it is suffering.

Worker processes come and go (crashes, recycles, rolling restarts) and each counts from zero, so the
exporter adds a finished process's last counts to its slot: a slot's counters only go up while the
primary runs. Job runs are counted from the scheduler's events as they end; their durations and the
webhook queue come from the store on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from .config import parse_bind
from .events import Event
from .metrics import BUCKET_BOUNDS, N_BUCKETS, WorkerStats
from .snapshot import ClusterSnapshot

if TYPE_CHECKING:  # the primary imports this module
    from .primary import Primary

PUBLISH_INTERVAL = 1.0  # the workers' heartbeats and psutil samples come no faster
LAG_INTERVAL = 0.25
LAG_WINDOW = 60.0  # seconds behind the lag maximum
STORE_INTERVAL = 5.0  # between reads of the webhook queue: a GROUP BY over the deliveries
RESOLVE_INTERVAL = 0.5  # between looks for the stored times of runs that have just ended
RESOLVE_GIVE_UP = 300.0  # a run whose times never reached the store (it was down) is not timed
PENDING_MAX = 1000
RUN_LOOKUP = 50  # recent runs of a job read to find the ones that just ended
STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")  # RequestCounters.by_class order; none: no response
WORKER_STATES = ("starting", "ready", "draining", "backoff")
JOB_OUTCOMES = ("succeeded", "failed", "timed_out")
DELIVERY_STATUSES = ("pending", "failed", "dead", "delivered")
# 6 significant digits: the workers' own buckets, with labels a person can read.
BUCKET_LABELS = tuple(f"{bound:.6g}" for bound in BUCKET_BOUNDS)


class MetricsError(Exception):
    """The metrics server cannot listen; the message names the address and why."""


@dataclass(frozen=True)
class MetricsView:
    """Everything a scrape reports except the loop lag, as the loop last saw it."""

    cluster: ClusterSnapshot
    requests: tuple[tuple[int, tuple[int, ...]], ...]  # (slot, counts by STATUS_CLASSES), never decreasing
    latency: tuple[int, ...]  # cluster-wide requests per BUCKET_BOUNDS bucket, then above the last
    job_runs: tuple[tuple[str, str, int], ...]  # (job, status, runs this primary ended)
    job_durations: tuple[tuple[str, int, float], ...]  # (job, runs timed, their seconds)
    deliveries: tuple[tuple[str, str, int], ...]  # (endpoint, status, rows in the store)


@dataclass(frozen=True)
class LagReading:
    last: float  # seconds the probe woke late, last time
    worst: float  # the most over LAG_WINDOW
    due: float  # time.monotonic() by which the probe should wake again


class MetricsExporter:
    """`/metrics` of one primary: `serve()` binds (before any worker starts), `watch()` starts publishing."""

    def __init__(self, bind: str) -> None:
        self.bind = bind
        self.view: MetricsView | None = None  # replaced whole by the loop, read by the HTTP thread
        self.lag: LagReading | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: list[Callable[[], None]] = []
        # Each worker process's stats (by identity: a pid may be reused) → its slot, at the last publish.
        self._live: dict[WorkerStats, int] = {}
        self._retired_requests: dict[int, list[int]] = {}  # per slot, what its finished processes counted
        self._retired_latency = [0] * N_BUCKETS
        self._job_runs: dict[tuple[str, str], int] = {}
        self._job_durations: dict[str, tuple[int, float]] = {}
        self._pending: dict[int, tuple[str, float]] = {}  # run id → (job, when it ended)
        self._deliveries: dict[tuple[str, str], int] = {}
        self._wake = asyncio.Event()
        self._last_complaint: str | None = None

    @classmethod
    def serve(cls, bind: str) -> MetricsExporter:
        """Listen on `bind` now (MetricsError if it cannot) and answer scrapes from a daemon thread."""
        exporter = cls(bind)
        exporter._listen()
        return exporter

    def _listen(self) -> None:
        target = parse_bind(self.bind)
        assert not isinstance(target, str), "config refuses unix: for [metrics] bind"
        host, port = target
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ClusterCollector(self))
        ProcessCollector(registry=registry)  # the primary's own CPU, memory and descriptors
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsError(f"[metrics] bind {self.bind}: cannot listen: {exc.strerror or exc}") from None

    def watch(self, primary: Primary) -> None:
        """Publish the primary's state for scrapes, from now until `close()`."""
        loop = asyncio.get_running_loop()
        self._unsubscribe.append(primary.events.subscribe(self._on_event))
        self._tasks += [
            loop.create_task(self._probe_lag()),
            loop.create_task(self._publish(primary)),
            loop.create_task(self._read_store(primary)),
        ]

    async def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            # shutdown() waits for serve_forever to notice, up to half a second: not on the loop.
            await asyncio.to_thread(self._stop_server, self._server)

    def _stop_server(self, server: WSGIServer) -> None:
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ------------------------------------------------------------------ on the loop

    async def _probe_lag(self) -> None:
        readings: deque[tuple[float, float]] = deque()
        last = worst = 0.0
        while True:
            slept = time.monotonic()
            self.lag = LagReading(last, worst, slept + LAG_INTERVAL)
            await asyncio.sleep(LAG_INTERVAL)
            woke = time.monotonic()
            last = max(0.0, woke - slept - LAG_INTERVAL)
            readings.append((woke, last))
            while readings[0][0] < woke - LAG_WINDOW:
                readings.popleft()
            worst = max(value for _, value in readings)

    async def _publish(self, primary: Primary) -> None:
        while True:
            try:
                self.view = self._build_view(primary)
            except Exception as exc:  # a bad tick must not end the metrics; scrapes keep the last view
                self._complain("publishing", exc)
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _build_view(self, primary: Primary) -> MetricsView:
        cluster = primary.snapshot()
        supervisor = primary.supervisor
        assert supervisor is not None
        live: dict[WorkerStats, int] = {}
        for slot in supervisor.slots.values():
            for worker in (slot.current, slot.incoming):
                if worker is not None:
                    live[worker.stats] = worker.slot
        for worker in supervisor.draining:
            live[worker.stats] = worker.slot
        # A process gone since the last publish: its stats object still holds what it counted last.
        for stats in self._live.keys() - live.keys():
            slot_id = self._live[stats]
            _add(self._retired_requests.setdefault(slot_id, [0] * len(STATUS_CLASSES)), stats.by_class)
            _add(self._retired_latency, stats.cumulative_histogram())
        self._live = live

        requests = {slot_id: list(counts) for slot_id, counts in self._retired_requests.items()}
        latency = list(self._retired_latency)
        for stats, slot_id in live.items():
            _add(requests.setdefault(slot_id, [0] * len(STATUS_CLASSES)), stats.by_class)
            _add(latency, stats.cumulative_histogram())
        for row in cluster.workers:  # every slot's series exists from the start, at zero
            requests.setdefault(row.id, [0] * len(STATUS_CLASSES))

        for job in cluster.jobs:
            for status in JOB_OUTCOMES:
                self._job_runs.setdefault((job.name, status), 0)
            self._job_durations.setdefault(job.name, (0, 0.0))
        for endpoint in cluster.endpoints:
            for status in DELIVERY_STATUSES:
                self._deliveries.setdefault((endpoint.name, status), 0)
        return MetricsView(
            cluster=cluster,
            requests=tuple((slot_id, tuple(requests[slot_id])) for slot_id in sorted(requests)),
            latency=tuple(latency),
            job_runs=tuple((job, status, n) for (job, status), n in sorted(self._job_runs.items())),
            job_durations=tuple((job, n, s) for job, (n, s) in sorted(self._job_durations.items())),
            deliveries=tuple((name, status, n) for (name, status), n in sorted(self._deliveries.items())),
        )

    def _on_event(self, event: Event) -> None:
        if event.kind not in ("job.succeeded", "job.failed"):
            return
        job = event.data.get("job")
        if not isinstance(job, str):
            return
        status = event.data.get("status") or "failed"  # a run ended by a stop carries no status: it failed
        self._job_runs[(job, status)] = self._job_runs.get((job, status), 0) + 1
        run_id = event.data.get("run_id")
        if isinstance(run_id, int) and len(self._pending) < PENDING_MAX:
            self._pending[run_id] = (job, time.monotonic())
            self._wake.set()

    async def _read_store(self, primary: Primary) -> None:
        store = primary.store
        assert store is not None
        counts_due = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= counts_due:
                    counts_due = now + STORE_INTERVAL
                    counts = await store.call(store.store.endpoint_counts)
                    for name, status in self._deliveries:  # a status with no rows left is 0, not its old count
                        self._deliveries[(name, status)] = counts.get(name, {}).get(status, 0)
                    for name, by_status in counts.items():
                        for status, n in by_status.items():
                            self._deliveries[(name, status)] = n
                if self._pending:
                    await self._time_runs(primary)
            except Exception as exc:  # the store may be busy or full: keep the last counts, try again
                self._complain("reading the store", exc)
            # Runs that just ended are written to the store in the background: look again soon.
            wait = RESOLVE_INTERVAL if self._pending else max(0.0, counts_due - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _time_runs(self, primary: Primary) -> None:
        jobs = {job for job, _ in self._pending.values()}
        for job in sorted(jobs):
            for run in await primary.job_history(job, None, RUN_LOOKUP):
                if run.id in self._pending and run.finished_at and run.status != "running":
                    del self._pending[run.id]
                    seconds = _seconds_between(run.started_at, run.finished_at)
                    count, total = self._job_durations.get(job, (0, 0.0))
                    self._job_durations[job] = (count + 1, total + seconds)
        cutoff = time.monotonic() - RESOLVE_GIVE_UP
        for run_id in [r for r, (_, ended) in self._pending.items() if ended < cutoff]:
            del self._pending[run_id]

    def _complain(self, what: str, exc: Exception) -> None:
        # Once per kind of failure, not once a second for as long as it lasts.
        message = f"clusterctl: metrics: {what}: {exc!r}"
        if message != self._last_complaint:
            self._last_complaint = message
            print(message, file=sys.stderr)


# ---------------------------------------------------------------------- in the HTTP thread


class _ClusterCollector:
    """Builds the families from the exporter's published values; never touches the live primary."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        lag = self.exporter.lag
        if lag is not None:
            yield from _lag_families(lag, time.monotonic())
        view = self.exporter.view
        if view is not None:
            yield from _worker_families(view)
            yield from _job_families(view)
            yield from _webhook_families(view)


def _lag_families(lag: LagReading, now: float) -> Iterator[Metric]:
    # A probe that is overdue is being held up right now: report that, not the last calm reading.
    overdue = max(0.0, now - lag.due)
    yield GaugeMetricFamily(
        "clusterctl_event_loop_lag_seconds",
        f"How late the primary's event loop woke from its last {LAG_INTERVAL}s sleep.",
        value=max(lag.last, overdue),
    )
    yield GaugeMetricFamily(
        "clusterctl_event_loop_lag_max_seconds",
        f"The most the primary's event loop woke late over the last {LAG_WINDOW:g}s.",
        value=max(lag.worst, overdue),
    )


def _worker_families(view: MetricsView) -> Iterator[Metric]:
    cluster = view.cluster
    yield GaugeMetricFamily("clusterctl_desired_workers", "Workers the cluster is set to run.", cluster.desired_workers)
    yield GaugeMetricFamily("clusterctl_generation", "The app generation new workers start with.", cluster.generation)

    requests = CounterMetricFamily(
        "clusterctl_worker_requests",
        "Requests served by each worker slot, by status class (none: no response), over every process in the slot.",
        labels=("slot", "status_class"),
    )
    for slot_id, counts in view.requests:
        for status_class, count in zip(STATUS_CLASSES, counts, strict=False):
            requests.add_metric((str(slot_id), status_class), count)
    yield requests

    latency = HistogramMetricFamily(
        "clusterctl_request_duration_seconds",
        "Request latency over all workers. Buckets only: workers count requests per bucket, not their total"
        ' time, and OpenMetrics allows no _count without a _sum (le="+Inf" is the count).',
    )
    buckets: list[tuple[str, float]] = []
    seen = 0
    for label, count in zip(BUCKET_LABELS, view.latency, strict=False):
        seen += count
        buckets.append((label, seen))
    buckets.append(("+Inf", sum(view.latency)))
    latency.add_metric((), buckets, None)
    yield latency

    in_flight = GaugeMetricFamily("clusterctl_worker_requests_in_flight", "Requests being served.", labels=("slot",))
    cpu = GaugeMetricFamily("clusterctl_worker_cpu_percent", "CPU use of the slot's processes.", labels=("slot",))
    rss = GaugeMetricFamily(
        "clusterctl_worker_resident_memory_bytes", "Resident memory of the slot's processes.", labels=("slot",)
    )
    restarts = CounterMetricFamily(
        "clusterctl_worker_restarts", "Times the slot's worker died and was replaced.", labels=("slot",)
    )
    states = GaugeMetricFamily(
        "clusterctl_worker_state",
        "Processes of the slot in each state (1 for the state of a settled slot).",
        labels=("slot", "state"),
    )
    # A slot has several rows while a replacement starts or an old process drains: add them up.
    slots: dict[int, dict[str, float]] = {}
    for row in cluster.workers:
        slot = slots.setdefault(row.id, {"in_flight": 0, "cpu": 0.0, "rss": 0, "restarts": 0})
        slot["in_flight"] += row.in_flight
        slot["cpu"] += row.cpu_percent
        slot["rss"] += row.rss_bytes
        slot["restarts"] = max(slot["restarts"], row.restarts)
        slot[row.state] = slot.get(row.state, 0) + 1
    for slot_id, slot in sorted(slots.items()):
        label = str(slot_id)
        in_flight.add_metric((label,), slot["in_flight"])
        cpu.add_metric((label,), slot["cpu"])
        rss.add_metric((label,), slot["rss"])
        restarts.add_metric((label,), slot["restarts"])
        for state in WORKER_STATES:
            states.add_metric((label, state), slot.get(state, 0))
    yield from (in_flight, cpu, rss, restarts, states)


def _job_families(view: MetricsView) -> Iterator[Metric]:
    runs = CounterMetricFamily(
        "clusterctl_job_runs", "Job runs this primary ran to an end, by outcome.", labels=("job", "status")
    )
    for job, status, count in view.job_runs:
        runs.add_metric((job, status), count)
    yield runs
    durations = SummaryMetricFamily(
        "clusterctl_job_run_duration_seconds",
        "Seconds from claim to end of the job runs this primary ran (retries included).",
        labels=("job",),
    )
    for job, count, seconds in view.job_durations:
        durations.add_metric((job,), count, seconds)
    yield durations
    running = GaugeMetricFamily("clusterctl_job_runs_in_progress", "Job runs in flight.", labels=("job",))
    for job in view.cluster.jobs:
        running.add_metric((job.name,), job.running)
    yield running


def _webhook_families(view: MetricsView) -> Iterator[Metric]:
    queue = GaugeMetricFamily(
        "clusterctl_webhook_deliveries",
        "Deliveries in the store by endpoint and status (pending and failed make the queue).",
        labels=("endpoint", "status"),
    )
    for endpoint, status, count in view.deliveries:
        queue.add_metric((endpoint, status), count)
    yield queue
    attempts = CounterMetricFamily(
        "clusterctl_webhook_attempts",
        "Delivery attempts this primary made, by outcome.",
        labels=("endpoint", "outcome"),
    )
    in_flight = GaugeMetricFamily("clusterctl_webhook_in_flight", "Deliveries on the wire.", labels=("endpoint",))
    enabled = GaugeMetricFamily(
        "clusterctl_webhook_endpoint_enabled", "0 once the receiver answered 410 Gone.", labels=("endpoint",)
    )
    for endpoint in view.cluster.endpoints:
        attempts.add_metric((endpoint.name, "delivered"), endpoint.delivered)
        attempts.add_metric((endpoint.name, "failed"), endpoint.failed)
        in_flight.add_metric((endpoint.name,), endpoint.in_flight)
        enabled.add_metric((endpoint.name,), 1 if endpoint.enabled else 0)
    yield from (attempts, in_flight, enabled)


# ---------------------------------------------------------------------- helpers


def _add(into: list[int], counts: Sequence[int]) -> None:
    for index, count in enumerate(counts[: len(into)]):
        into[index] += count


def _seconds_between(start: str, end: str) -> float:
    try:
        return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    except ValueError:
        return 0.0
