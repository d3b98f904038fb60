"""ASGI app for the proxy tests: echoes what the worker made of the connection."""

import json


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/mark":
        # A line on stdout that follows every earlier request's access-log line in workers.log.
        print(f"mark {scope['query_string'].decode()}")
    body = {"scheme": scope["scheme"], "client": scope["client"]}
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
