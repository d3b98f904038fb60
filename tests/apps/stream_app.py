"""ASGI app for the write path: small answers, a big body sent without pausing, and chunks apart in time."""

import asyncio
import os

CHUNK = 1024 * 1024


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-pid", str(os.getpid()).encode())]})
    if path == "/big":
        # MiB after MiB, never waiting on anything but send(): only back-pressure can slow it down.
        chunks = int(scope["query_string"] or b"64")
        for index in range(chunks):
            await send({"type": "http.response.body", "body": bytes([index % 256]) * CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/ticks":
        await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"tock\n"})
    else:
        await send({"type": "http.response.body", "body": b"ok"})
