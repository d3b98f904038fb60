"""The crash-loop policy: when a dead worker's slot is refilled, at once or after a back-off.

One `RestartPolicy` per slot. It is pure bookkeeping over an injected clock and
OOM counter, so the rules are unit-tested with fake deaths; the supervisor
only reports each death and honours the delay it gets back.

The rules:
- a worker that was ready for `STABLE_AFTER` seconds died of something new:
  the slot's failure count starts again;
- one early death may be bad luck: replaced at once. A second in a row, or an
  app that cannot even load, is a crash loop: back off exponentially;
- a SIGKILL from outside (an operator, chaos testing) says nothing about the
  app, so it is forgiven, but only for a worker that had become ready, only
  when the kernel's OOM killer did not just act (an app that outgrows memory
  gets killed at exactly the rate it regrows, which is a crash loop), and only
  up to `OUTSIDE_KILLS_TOLERATED` in `OUTSIDE_WINDOW` seconds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

STABLE_AFTER = 10.0
OUTSIDE_WINDOW = 300.0
OUTSIDE_KILLS_TOLERATED = 30
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0

# Counters the kernel bumps on every OOM kill: system-wide, and for our memory cgroup (v2, then v1).
_OOM_COUNTERS = (
    (Path("/proc/vmstat"), "oom_kill "),
    (Path("/sys/fs/cgroup/memory.events"), "oom_kill "),
    (Path("/sys/fs/cgroup/memory/memory.oom_control"), "oom_kill "),
)


def oom_kills() -> int:
    """The sum of the OOM-kill counters this machine exposes (0 where it exposes none)."""
    total = 0
    for path, prefix in _OOM_COUNTERS:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(prefix):
                total += int(line[len(prefix) :].strip() or 0)
    return total


class RestartPolicy:
    def __init__(self, clock: Callable[[], float] = time.monotonic, oom: Callable[[], int] = oom_kills) -> None:
        self.clock = clock
        self.oom = oom
        self.failures = 0
        self.backoff_until = 0.0
        self._outside_kills: list[float] = []
        self._oom_seen = oom()

    def spawned(self) -> None:
        """A new worker starts in this slot: OOM kills before now are not its doing."""
        self._oom_seen = self.oom()

    def died(self, exit_code: int, *, killed_by_us: bool, ready_at: float | None, boot_error: bool) -> float:
        """Record a death; return the back-off in seconds before the slot is refilled (0: at once)."""
        now = self.clock()
        oom_now = self.oom()
        oom_killed, self._oom_seen = oom_now > self._oom_seen, oom_now
        stable = ready_at is not None and now - ready_at >= STABLE_AFTER
        if exit_code == -signal.SIGKILL and not killed_by_us and ready_at is not None and not oom_killed:
            self._outside_kills = [t for t in self._outside_kills if now - t < OUTSIDE_WINDOW] + [now]
            stable = stable or len(self._outside_kills) <= OUTSIDE_KILLS_TOLERATED
        self.failures = 0 if stable else self.failures + 1
        delay = 0.0
        if boot_error or self.failures > 1:
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, self.failures - 2))
        self.backoff_until = now + delay
        return delay
