"""Cluster events: one internal interface for everything that happens.

The supervisor, the primary (and later the scheduler) publish here; the
headless log, the console, the store and the webhook outbox subscribe.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # worker.spawned, worker.crashed, cluster.scaled, ...
    message: str
    worker_id: int | None = None
    pid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self, keep: int = 500) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(
        self,
        kind: str,
        message: str,
        worker_id: int | None = None,
        pid: int | None = None,
        **data: Any,
    ) -> Event:
        return self.relay(Event(kind, message, worker_id, pid, data))

    def relay(self, event: Event) -> Event:
        """Publish an event made elsewhere (an attached console relays its primary's, times and all)."""
        self.recent.append(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:  # a broken subscriber (a closed console) must not fail the publisher
                self._subscribers.remove(subscriber)
                print(f"clusterctl: dropped an event subscriber that failed: {exc!r}", file=sys.stderr)
        return event
