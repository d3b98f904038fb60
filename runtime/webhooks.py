"""The webhook runner: delivers the outbox from the primary, signed, retried, one queue per endpoint.

Each endpoint has its own loop and concurrency limit, so a slow or dead
endpoint never delays the others. A loop leases due deliveries in the store
(so two primaries on one store never send the same attempt twice, and a dead
primary's leases are taken back at the next start), sends them with httpx,
and records the outcome: 2xx delivered; anything else retried with
exponential back-off and jitter (or the receiver's Retry-After) until
`max_attempts`, then `dead`; 410 Gone disables the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from .config import WebhookConfig
from .events import Event, EventBus
from .outbox import body_for, matches, new_event_id, resolve_secret, sign
from .processes import pid_alive
from .snapshot import EndpointSnapshot
from .store import STORE_ERRORS, AsyncStore

# Cluster events that are also webhook events (DESIGN.md).
CLUSTER_EVENTS = {
    "worker.crashed",
    "worker.recycled",
    "cluster.scaled",
    "cluster.reloaded",
    "cluster.reload_failed",
    "job.succeeded",
    "job.failed",
}
POLL_INTERVAL = 0.2  # seconds between looks at the outbox when an endpoint's queue is empty
RETRY_CAP = 3600.0
RETRY_AFTER_CAP = 6 * 3600.0
STOP_GRACE = 5.0
POOL_SIZE = 8  # connections per httpx client
DISABLED = "410 Gone: the receiver asked us to stop; fix it and restart the primary to re-enable"


@dataclass
class Endpoint:
    config: WebhookConfig
    key: bytes = field(repr=False)
    enabled: bool = True
    clients: list[httpx.AsyncClient] = field(default_factory=list)
    sent: int = 0
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)
    delivered: int = 0
    failed: int = 0
    last_error: str | None = None
    freed: asyncio.Event = field(default_factory=asyncio.Event)
    loop: asyncio.Task[None] | None = None


class WebhookRunner:
    def __init__(
        self,
        hooks: tuple[WebhookConfig, ...],
        store: AsyncStore,
        events: EventBus,
        pid: int,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        # Resolved now, so a missing secret stops the start with a clear message (SecretError).
        self.endpoints = {hook.name: Endpoint(hook, resolve_secret(hook.secret, hook.name, environ)) for hook in hooks}
        self.store = store
        self.events = events
        self.pid = pid
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Any = None

    async def start(self) -> None:
        db = self.store.store
        await self._publish()
        released = await self.store.call(db.release_leases, lambda pid: pid != self.pid and pid_alive(pid))
        if released:
            self.events.publish(
                "webhook.resumed", f"{released} deliveries left in flight by a dead primary are queued again"
            )
        self._unsubscribe = self.events.subscribe(self._on_event)
        for endpoint in self.endpoints.values():
            self._open(endpoint)

    async def update(self, hooks: tuple[WebhookConfig, ...], keys: dict[str, bytes]) -> list[str]:
        """Take the webhooks of a reloaded config (`keys`: their resolved secrets); returns what changed.

        A removed or changed endpoint's loop stops; deliveries on the wire get STOP_GRACE to finish,
        and the rest keep their leases until these run out, when the new loop takes them.
        """
        wanted = {hook.name: hook for hook in hooks}
        before = set(self.endpoints)
        changes = [f"webhook {name} added" for name in wanted if name not in before]
        for name, endpoint in list(self.endpoints.items()):
            if wanted.get(name) != endpoint.config or keys.get(name) != endpoint.key:
                del self.endpoints[name]
                await self._close(endpoint)
                changes.append(f"webhook {name} {'changed' if name in wanted else 'removed'}")
        for name, hook in wanted.items():
            if name not in self.endpoints:
                self.endpoints[name] = endpoint = Endpoint(hook, keys[name])
                self._open(endpoint)
        await self._publish()
        return changes

    async def _publish(self) -> None:
        """The endpoints (never their secrets) in the store, for `emit()` in any process to fan out to."""
        published = [
            {
                "name": e.config.name,
                "url": e.config.url,
                "events": list(e.config.events),
                "max_attempts": e.config.max_attempts,
            }
            for e in self.endpoints.values()
        ]
        await self.store.call(self.store.store.sync_endpoints, published)

    def _open(self, endpoint: Endpoint) -> None:
        # httpx scans its whole pool on every request: small pools, taken in turn, keep that cheap.
        size = endpoint.config.concurrency
        for start in range(0, size, POOL_SIZE):
            pool = min(POOL_SIZE, size - start)
            limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
            endpoint.clients.append(httpx.AsyncClient(follow_redirects=False, limits=limits))
        endpoint.loop = asyncio.get_running_loop().create_task(self._endpoint_loop(endpoint))
        self._tasks.add(endpoint.loop)
        endpoint.loop.add_done_callback(self._tasks.discard)

    async def _close(self, endpoint: Endpoint) -> None:
        if endpoint.loop is not None:
            endpoint.loop.cancel()
        if endpoint.in_flight:
            await asyncio.wait(list(endpoint.in_flight), timeout=STOP_GRACE)
            for task in endpoint.in_flight:
                task.cancel()
        for client in endpoint.clients:
            await client.aclose()

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        in_flight = [task for e in self.endpoints.values() for task in e.in_flight]
        for task in list(self._tasks):
            if task not in in_flight:
                task.cancel()
        if in_flight:  # let deliveries already on the wire finish, briefly: fewer duplicates after a restart
            await asyncio.wait(in_flight, timeout=STOP_GRACE)
            for task in in_flight:
                task.cancel()
        for endpoint in self.endpoints.values():
            for client in endpoint.clients:
                await client.aclose()

    def snapshot(self) -> list[EndpointSnapshot]:
        return [
            EndpointSnapshot(
                name=name,
                url=e.config.url,
                enabled=e.enabled,
                in_flight=len(e.in_flight),
                delivered=e.delivered,
                failed=e.failed,
                last_error=e.last_error,
            )
            for name, e in self.endpoints.items()
        ]

    def _on_event(self, event: Event) -> None:
        if event.kind not in CLUSTER_EVENTS:
            return
        targets = [n for n, e in self.endpoints.items() if e.enabled and matches(e.config.events, event.kind)]
        payload = {"message": event.message, "worker_id": event.worker_id, "pid": event.pid, **event.data}
        payload_json = json.dumps(payload, separators=(",", ":"), default=str)
        self.store.submit(self.store.store.emit, new_event_id(), event.kind, payload_json, targets)

    async def _endpoint_loop(self, endpoint: Endpoint) -> None:
        config = endpoint.config
        while True:
            if not endpoint.enabled:
                # Disabled by a 410: what is queued (or emitted before every process noticed)
                # is marked dead, to be replayed once the receiver is fixed, not left pending forever.
                await self._record(endpoint, self.store.store.kill_queue, config.name, DISABLED)
                await asyncio.sleep(POLL_INTERVAL * 5)
                continue
            room = config.concurrency - len(endpoint.in_flight)
            # Lease in batches (fewer store round trips), but never leave the endpoint idle.
            if room <= 0 or (endpoint.in_flight and room < max(1, config.concurrency // 4)):
                endpoint.freed.clear()
                await endpoint.freed.wait()
                continue
            try:
                batch = await self.store.call(
                    self.store.store.lease_deliveries, config.name, self.pid, room, config.timeout + 30
                )
            except Exception as exc:  # the store may be busy or full: say so, try again
                endpoint.last_error = f"store: {exc}"
                batch = []
            for delivery in batch:
                task = asyncio.get_running_loop().create_task(self._deliver(endpoint, delivery))
                endpoint.in_flight.add(task)
                task.add_done_callback(lambda t, e=endpoint: (e.in_flight.discard(t), e.freed.set()))
            if not batch:
                await asyncio.sleep(POLL_INTERVAL)

    async def _deliver(self, endpoint: Endpoint, delivery: dict[str, Any]) -> None:
        config = endpoint.config
        endpoint.sent += 1
        client = endpoint.clients[endpoint.sent % len(endpoint.clients)]
        attempt = delivery["attempt"] + 1
        body = body_for(delivery["type"], delivery["created_at"], delivery["payload"])
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "clusterctl-tui",
            "webhook-id": delivery["event_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.key, delivery["event_id"], timestamp, body),
        }
        code: int | None = None
        retry_after: float | None = None
        try:
            response = await client.post(config.url, content=body, headers=headers, timeout=config.timeout)
            code = response.status_code
            error = None if 200 <= code < 300 else f"HTTP {code}: {response.text[:200]}"
            retry_after = _retry_after(response.headers.get("retry-after"))
        except httpx.TimeoutException:
            error = f"no answer within {config.timeout:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        db = self.store.store
        if error is None:
            endpoint.delivered += 1
            await self._record(endpoint, db.finish_delivery, delivery["id"], attempt, "delivered", code, None, None)
            return
        endpoint.failed += 1
        endpoint.last_error = error
        if code == 410:
            endpoint.enabled = False
            reason = DISABLED
            await self._record(endpoint, db.disable_endpoint, config.name, reason)
            await self._record(endpoint, db.finish_delivery, delivery["id"], attempt, "dead", code, reason, None)
            self.events.publish("webhook.endpoint_disabled", f"{config.name}: {reason}", endpoint=config.name)
            return
        if attempt >= config.max_attempts:
            await self._record(endpoint, db.finish_delivery, delivery["id"], attempt, "dead", code, error, None)
            self.events.publish(
                "webhook.dead",
                f"{config.name}: {delivery['type']} {delivery['event_id']} dead after {attempt} attempts: {error}",
                endpoint=config.name,
                delivery_id=delivery["id"],
            )
            return
        delay = retry_after if retry_after is not None else backoff(config.retry_base, attempt)
        await self._record(endpoint, db.finish_delivery, delivery["id"], attempt, "failed", code, error, delay)

    async def _record(self, endpoint: Endpoint, fn: Callable[..., Any], *args: Any) -> None:
        """Write an outcome; one the store refuses (full, unreachable) is not lost: the delivery's
        lease runs out and it is sent again (at least once), so this only says so."""
        try:
            await self.store.call(fn, *args)
        except STORE_ERRORS as exc:
            endpoint.last_error = f"store: {exc}"
            self.store.last_error = f"store {self.store.store.label}: {exc}"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def backoff(base: float, attempt: int) -> float:
    """Exponential with ±25 % jitter: base, 2·base, 4·base, … capped at an hour."""
    return min(RETRY_CAP, base * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(RETRY_AFTER_CAP, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return min(RETRY_AFTER_CAP, max(0.0, when.timestamp() - time.time()))
    return None
