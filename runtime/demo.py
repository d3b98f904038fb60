"""The bundled demo app: what `clusterctl-tui` serves when there is no config.

A plain ASGI app with a few endpoints that make every panel move: a fast one,
a CPU-bound one, a slow one, an error, and a health check.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any


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
    elif path == "/error":
        await _respond(send, 500, b'{"error": "the demo fails here on purpose"}')
    else:
        body = {"hello": "from clusterctl-tui", "worker": worker, "pid": os.getpid()}
        await _respond(send, 200, json.dumps(body).encode())
