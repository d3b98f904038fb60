"""The app every server serves in run.py's HTTP figures: plain ASGI, the standard library only.

    GET /      200 `ok`
    GET /slow  200 `ok` after SLOW_ROUNDS rounds of SHA-256 (a fixed amount of CPU work, about 2 ms on
               the 2-core machine run.py was tuned on; run.py measures it and prints the figure)
    GET /pid   200 `{"pid": N}`: the body tests/bench/pid_counts.lua reads to count requests per worker

Every response carries `x-pid: <pid>` (the serving process), which is how run.py tells a replacement
worker from the one it replaced. The work in `/slow` is a count of rounds, not a duration, so every
server does exactly the same work per request. No lifespan work and nothing at import beyond the
standard library: what a worker costs here is the server's own cost.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

SLOW_ROUNDS = 7500


def burn(rounds: int = SLOW_ROUNDS) -> bytes:
    digest = b"clusterctl"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    status, body = 200, b"ok"
    if path == "/slow":
        burn()
    elif path == "/pid":
        body = b'{"pid": %d}' % os.getpid()
    elif path != "/":
        status, body = 404, b"not found"
    headers = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"%d" % len(body)),
        (b"x-pid", b"%d" % os.getpid()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
