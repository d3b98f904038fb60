"""A real webhook receiver for the tests: verifies every Standard Webhooks signature, answers as told.

    with Receiver(SECRET) as rx:
        rx.answer("/flaky", Answer(500), Answer(500), then=Answer(200))
        rx.answer("/slow", then=Answer(200, delay=3))
        rx.answer("/busy", Answer(429, headers={"Retry-After": "2"}))
        url = rx.url("/flaky")
        ...
        rx.requests("/flaky")  # [Request(path, headers, body, signature_ok, at), ...] in arrival order

Each path has a script (answers used once each, in order) and a standing answer
used after the script runs out (200 unless told otherwise). A request is
recorded when it arrives, before any delay, so a test can see what is in flight.
The signature is checked independently of `runtime.outbox` (stdlib HMAC only).
With `who=True` each request also records which local process sent it (psutil).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil

TOLERANCE = 300  # seconds: the Standard Webhooks recommended timestamp tolerance


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    signature_ok: bool
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    status: int  # what we answered (or are about to)
    sender_pid: int | None = None  # the process on the other end (only with Receiver(..., who=True))

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def timestamp(self) -> int:
        return int(self.headers.get("webhook-timestamp", "0"))

    def json(self) -> Any:
        return json.loads(self.body)


def verify(key: bytes, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """True if one of the `v1,` signatures is the HMAC of "{id}.{timestamp}.{body}" and the timestamp is fresh."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not stamp or not signatures or not stamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE:
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return True
    return False


class Receiver:
    def __init__(self, secret: str, who: bool = False) -> None:
        assert secret.startswith("whsec_")
        self.key = base64.b64decode(secret[len("whsec_") :])
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Answer]] = {}
        self._standing: dict[str, Answer] = {}
        self._requests: list[Request] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = receiver._next_answer(self.path)
                request = Request(
                    path=self.path,
                    headers=headers,
                    body=body,
                    signature_ok=verify(receiver.key, headers, body),
                    at=time.monotonic(),
                    wall=time.time(),
                    status=answer.status,
                    sender_pid=receiver._sender_pid(self.client_address) if who else None,
                )
                with receiver._lock:
                    receiver._requests.append(request)
                if answer.delay:
                    time.sleep(answer.delay)
                payload = b'{"ok": true}' if 200 <= answer.status < 300 else b'{"error": "as told"}'
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the sender gave up (timeout, or it was killed): nothing to answer
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _sender_pid(self, peer: tuple[str, int]) -> int | None:
        """Which local process holds the other end of this connection (same user: psutil can tell)."""
        for conn in psutil.net_connections("tcp4"):
            if conn.laddr and conn.raddr and tuple(conn.laddr) == tuple(peer[:2]) and conn.raddr[1] == self.port:
                return conn.pid
        return None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *script: Answer, then: Answer | None = None) -> None:
        """Answer the next requests on `path` with `script` in order, then with `then` (default: keep the last)."""
        with self._lock:
            self._scripts[path] = deque(script)
            if then is not None:
                self._standing[path] = then
            elif script:
                self._standing[path] = script[-1]

    def _next_answer(self, path: str) -> Answer:
        with self._lock:
            script = self._scripts.get(path)
            if script:
                return script.popleft()
            return self._standing.get(path, Answer())

    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def ids(self, path: str | None = None) -> list[str]:
        return [r.id for r in self.requests(path)]
