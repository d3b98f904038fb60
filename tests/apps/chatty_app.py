"""Writes to stdout at import and to stderr on each request."""

import sys

from asgi_app import app as _inner

print("hello from import")


async def app(scope, receive, send):
    if scope["type"] == "http":
        print("served a request", file=sys.stderr)
    await _inner(scope, receive, send)
