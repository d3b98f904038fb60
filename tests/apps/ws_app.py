"""ASGI app with a lifespan, a WebSocket echo at `/ws` and a broadcast at `/broadcast`; plain HTTP is asgi_app's.

The broadcast handler never reads from its socket: it waits for news on a channel that stays quiet, as a
pub/sub fan-out does between messages.

The socket first sends `{"pid": ...}` so a test knows which worker holds it. On
lifespan shutdown the worker appends its pid to the file named by
`TEST_SHUTDOWN_MARKER`, so a test can tell that shutdown ran in that worker.
"""

import asyncio
import json
import os

from asgi_app import app as http_app


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with open(os.environ["TEST_SHUTDOWN_MARKER"], "a") as marker:
                    marker.write(f"{os.getpid()}\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps({"pid": os.getpid()})})
        if scope["path"] == "/broadcast":
            await asyncio.Event().wait()
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
    else:
        await http_app(scope, receive, send)
