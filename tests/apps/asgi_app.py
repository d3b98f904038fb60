"""ASGI app for the tests: each endpoint makes a worker do one thing on purpose."""

import asyncio
import json
import os
import time
from pathlib import Path

# Read once at import: a replacement worker started after the file appears is unhealthy.
UNHEALTHY = Path(os.environ.get("TEST_UNHEALTHY_FILE", "/nonexistent")).exists()


async def _send(send, status, body):
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/healthz":
        await _send(send, 503 if UNHEALTHY else 200, b"{}")
    elif path == "/hang":
        time.sleep(3600)  # blocks the event loop: heartbeats stop
    elif path == "/crash":
        os._exit(17)
    elif path == "/sleep":
        await asyncio.sleep(float(scope["query_string"] or b"0.2"))
        await _send(send, 200, b"{}")
    elif path == "/env":
        keys = [k for k in os.environ if k.startswith("CLUSTERCTL_") and k != "CLUSTERCTL_WORKER_SPEC"]
        await _send(send, 200, json.dumps({k: os.environ[k] for k in keys}).encode())
    else:
        body = {"worker": os.environ.get("CLUSTERCTL_WORKER_ID"), "pid": os.getpid()}
        await _send(send, 200, json.dumps(body).encode())
