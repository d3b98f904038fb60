"""Request metrics: recorded cheaply in each worker, aggregated on the primary.

A worker keeps cumulative counters (requests by status class, a latency
histogram with fixed log-spaced buckets) and sends them with each heartbeat.
The primary turns consecutive cumulative samples into per-second rates and
p50/p99 over a recent window; cumulative counters make a lost heartbeat
harmless.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# Upper bounds in seconds: 50 µs growing by 30 % per bucket, to about 100 s.
BUCKET_BOUNDS: tuple[float, ...] = tuple(50e-6 * 1.3**i for i in range(56))
N_BUCKETS = len(BUCKET_BOUNDS) + 1  # the last one is everything above
RATE_WINDOW = 2.0  # seconds of samples behind a req/s figure
LATENCY_WINDOW = 10.0  # seconds of samples behind p50/p99
HISTORY = 120  # one point a second for the sparklines


class RequestCounters:
    """The worker-side recorder. Plain attributes: it runs on every request."""

    __slots__ = ("by_status", "histogram", "in_flight")

    def __init__(self) -> None:
        self.by_status = [0] * 10  # index = status // 100 (0: no response; 6-9: nonstandard codes)
        self.histogram = [0] * N_BUCKETS
        self.in_flight = 0

    def record(self, status: int, seconds: float) -> None:
        try:
            self.by_status[status // 100] += 1
        except IndexError:  # a status code of 1000 or more: count it with the server errors
            self.by_status[9] += 1
        self.histogram[bisect_left(BUCKET_BOUNDS, seconds)] += 1

    def by_class(self) -> list[int]:
        """Requests by status class 0-5; codes of 600 and over count as 5xx."""
        counts = self.by_status
        return [*counts[:5], sum(counts[5:])]


def percentile(histogram: Sequence[int], fraction: float) -> float:
    """Latency in ms below which `fraction` of the counted requests fall (0.0 if none)."""
    total = sum(histogram)
    if total == 0:
        return 0.0
    rank = fraction * total
    seen = 0
    for index, count in enumerate(histogram):
        if count and seen + count >= rank:
            lower = BUCKET_BOUNDS[index - 1] if index > 0 else 0.0
            upper = BUCKET_BOUNDS[index] if index < len(BUCKET_BOUNDS) else BUCKET_BOUNDS[-1] * 1.3
            return (lower + (upper - lower) * (rank - seen) / count) * 1000.0
        seen += count
    return BUCKET_BOUNDS[-1] * 1000.0


@dataclass
class _Sample:
    at: float
    total: int
    errors: int
    histogram: tuple[int, ...]


class WorkerStats:
    """The primary's view of one worker's counters over time."""

    def __init__(self) -> None:
        self._samples: deque[_Sample] = deque()
        self.requests_total = 0
        self.by_class: tuple[int, ...] = (0,) * 6
        self.in_flight = 0
        self.rps_history: deque[float] = deque(maxlen=HISTORY)

    def update(self, by_class: Sequence[int], histogram: Sequence[int], in_flight: int, now: float) -> None:
        self.by_class = tuple(by_class)
        self.requests_total = sum(by_class)
        self.in_flight = in_flight
        errors = by_class[0] + by_class[5]
        self._samples.append(_Sample(now, self.requests_total, errors, tuple(histogram)))
        while len(self._samples) > 2 and now - self._samples[1].at > LATENCY_WINDOW:
            self._samples.popleft()

    def _base(self, now: float, window: float) -> _Sample | None:
        for sample in self._samples:
            if now - sample.at <= window + 0.5:
                return sample
        return self._samples[0] if self._samples else None

    def rate(self, now: float) -> float:
        if len(self._samples) < 2:
            return 0.0
        base, last = self._base(now, RATE_WINDOW), self._samples[-1]
        assert base is not None
        if now - last.at > RATE_WINDOW * 2:  # no fresh heartbeat: say nothing rather than a stale figure
            return 0.0
        span = last.at - base.at
        return (last.total - base.total) / span if span > 0 else 0.0

    def cumulative_histogram(self) -> tuple[int, ...]:
        """The worker's running latency counts since it started (its newest heartbeat's)."""
        return self._samples[-1].histogram if self._samples else ()

    def window_histogram(self) -> list[int]:
        if not self._samples:
            return [0] * N_BUCKETS
        first, last = self._samples[0], self._samples[-1]
        if first is last:
            return list(last.histogram)
        return [b - a for a, b in zip(first.histogram, last.histogram, strict=True)]

    def window_errors(self) -> tuple[int, int]:
        """(errors, requests) over the latency window."""
        if len(self._samples) < 2:
            return 0, 0
        first, last = self._samples[0], self._samples[-1]
        return last.errors - first.errors, last.total - first.total

    def tick_history(self, now: float) -> None:
        self.rps_history.append(self.rate(now))


def merge(histograms: Sequence[Sequence[int]]) -> list[int]:
    merged = [0] * N_BUCKETS
    for histogram in histograms:
        for index, count in enumerate(histogram):
            merged[index] += count
    return merged
