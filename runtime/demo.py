"""The bundled demo: what `clusterctl-tui` serves when there is no config.

A plain ASGI app with endpoints that make every panel move (a fast one, a
CPU-bound one, a slow one, an error, one that emits a webhook event, and a
receiver for the demo webhook), a demo job, a demo webhook delivered to the
app itself, and a light load generator the console can switch on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
from datetime import UTC, datetime
from typing import Any

from .config import JobConfig, Settings, WebhookConfig, parse_bind

# Not a secret: the demo signs its webhook to itself with it, so the receiver can check.
DEMO_WEBHOOK_SECRET = "whsec_ZGVtby1zZWNyZXQtZm9yLXRoZS1idW5kbGVkLWRlbW8="


async def _respond(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _burn_cpu(milliseconds: float) -> str:
    digest = b"clusterctl"
    rounds = int(milliseconds * 400)
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    worker = os.environ.get("CLUSTERCTL_WORKER_ID", "?")
    if path == "/healthz":
        await _respond(send, 200, b"ok", b"text/plain")
    elif path == "/work":
        await _respond(send, 200, json.dumps({"worker": worker, "digest": _burn_cpu(2)}).encode())
    elif path == "/slow":
        await asyncio.sleep(0.2)
        await _respond(send, 200, json.dumps({"worker": worker, "slept_ms": 200}).encode())
    elif path == "/order":
        from .outbox import emit

        event_id = emit("app.order_created", {"order": random.randint(1000, 9999), "worker": worker})
        await _respond(send, 201, json.dumps({"event": event_id}).encode())
    elif path == "/hooks/demo":
        await _receive_webhook(scope, receive, send)
    elif path == "/error":
        await _respond(send, 500, b'{"error": "the demo fails here on purpose"}')
    else:
        body = {"hello": "from clusterctl-tui", "worker": worker, "pid": os.getpid()}
        await _respond(send, 200, json.dumps(body).encode())


async def _receive_webhook(scope: dict[str, Any], receive: Any, send: Any) -> None:
    from .outbox import resolve_secret, sign

    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    expected = sign(
        resolve_secret(DEMO_WEBHOOK_SECRET, "demo"),
        headers.get("webhook-id", ""),
        int(headers.get("webhook-timestamp", "0") or 0),
        body,
    )
    ok = expected in headers.get("webhook-signature", "").split()
    await _respond(send, 204 if ok else 401, b"")


def report() -> str:
    """The demo job: a `call` job, run in a child interpreter on the primary once a minute."""
    return f"demo report at {datetime.now(UTC):%H:%M:%S} from pid {os.getpid()}"


def with_demo_extras(settings: Settings) -> Settings:
    """No config and no --app: add the demo job and a webhook delivered to the demo app itself."""
    if settings.source is not None or not settings.is_demo:
        return settings
    job = JobConfig(name="demo-report", schedule="* * * * *", call="runtime.demo:report", timeout=30)
    hooks: tuple[WebhookConfig, ...] = ()
    target = parse_bind(settings.server.bind)
    if not isinstance(target, str):
        host, port = target
        hooks = (
            WebhookConfig(
                name="demo",
                url=f"http://{host}:{port}/hooks/demo",
                events=("*",),
                secret=DEMO_WEBHOOK_SECRET,
                retry_base=1.0,
            ),
        )
    return dataclasses.replace(settings, jobs=(job,), webhooks=hooks)


class LoadGenerator:
    """A light, bounded load on the demo app (about `rate` requests a second), for live figures."""

    PATHS = ("/",) * 8 + ("/work",) * 6 + ("/slow",) * 2 + ("/order", "/error")

    def __init__(self, address: str, rate: float = 40.0) -> None:
        self.base = f"http://{address}"
        self.rate = rate
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def toggle(self) -> bool:
        if self.running:
            assert self._task is not None
            self._task.cancel()
            self._task = None
            return False
        self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    async def _run(self) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.base, timeout=5) as client:
            while True:
                if len(self._in_flight) < 50:  # bounded: a stalled cluster does not pile up requests
                    task = asyncio.get_running_loop().create_task(self._one(client, random.choice(self.PATHS)))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                await asyncio.sleep(random.expovariate(self.rate))

    async def _one(self, client: Any, path: str) -> None:
        import httpx

        try:
            await client.get(path)
            self.sent += 1
        except httpx.HTTPError:
            pass
