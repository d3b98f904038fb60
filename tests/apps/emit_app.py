"""ASGI app for the webhook tests: `/emit?type=app.x&n=3` calls `runtime.emit` n times in this worker.

Answers `{"ids": [...], "data": [...], "worker": "1", "pid": 123}`: the ids emit() returned and the
payloads it was given, so a test can compare them with what the receiver got.
"""

import json
import os
from urllib.parse import parse_qs

from asgi_app import _send

from runtime import emit


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    worker = os.environ.get("CLUSTERCTL_WORKER_ID")
    if scope["path"] == "/emit":
        query = parse_qs(scope["query_string"].decode())
        kind = query.get("type", ["app.test"])[0]
        n = int(query.get("n", ["1"])[0])
        tag = query.get("tag", [""])[0]
        ids, data = [], []
        for i in range(n):
            payload = {"i": i, "tag": tag, "worker": worker, "pid": os.getpid(), "nested": {"ok": True, "x": [1, 2]}}
            ids.append(emit(kind, payload))
            data.append(payload)
        body = {"ids": ids, "data": data, "worker": worker, "pid": os.getpid()}
        await _send(send, 200, json.dumps(body).encode())
    else:
        await _send(send, 200, json.dumps({"worker": worker, "pid": os.getpid()}).encode())
