"""The outbox: `emit()` from app code in any process, and the Standard Webhooks wire format.

`emit(type, payload)` writes the event and one pending delivery per matching
endpoint to the store in one transaction and returns the event id at once; it
never touches the network. Only the primary delivers (`runtime.webhooks`).
The endpoints and their event filters are read from the store, where the
primary publishes them at start; secrets never leave the primary.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from .store import Store

ENDPOINTS_TTL = 1.0  # seconds an emitting process trusts its cached endpoint list


class SecretError(Exception):
    """A webhook secret cannot be resolved; the message names the reference, never the value."""


def new_event_id() -> str:
    """`msg_` + time-ordered hex: unique across processes, sortable by creation."""
    return f"msg_{time.time_ns():016x}{secrets.token_hex(6)}"


def matches(patterns: list[str] | tuple[str, ...], kind: str) -> bool:
    for pattern in patterns:
        if pattern in ("*", kind):
            return True
        if pattern.endswith(".*") and kind.startswith(pattern[:-1]):
            return True
    return False


def resolve_secret(reference: str, webhook: str) -> bytes:
    """`env:NAME`, `file:PATH` or a literal `whsec_<base64>` → the HMAC key bytes."""
    if reference.startswith("env:"):
        name = reference[4:]
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"webhook {webhook!r}: secret env:{name} is not set")
    elif reference.startswith("file:"):
        path = Path(reference[5:]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SecretError(f"webhook {webhook!r}: secret file {path}: {exc.strerror or exc}") from None
    elif reference:
        value = reference
    else:
        raise SecretError(f'webhook {webhook!r}: no secret (set secret = "env:NAME" or "file:PATH")')
    where = reference if reference.startswith(("env:", "file:")) else "(inline value)"
    if not value.startswith("whsec_"):
        raise SecretError(f"webhook {webhook!r}: secret {where} must look like whsec_<base64>")
    try:
        key = base64.b64decode(value[len("whsec_") :], validate=True)
    except ValueError:
        raise SecretError(f"webhook {webhook!r}: secret {where} is not valid base64 after whsec_") from None
    if not key:
        raise SecretError(f"webhook {webhook!r}: secret {where} is empty")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def body_for(kind: str, created_at: str, payload_json: str) -> bytes:
    """The delivered JSON body; the same bytes on every attempt of one event."""
    return f'{{"type": {json.dumps(kind)}, "timestamp": {json.dumps(created_at)}, "data": {payload_json}}}'.encode()


class _Outbox:
    """One per process and store path: a connection and a short-lived cache of endpoint filters."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.lock = threading.Lock()
        self._endpoints: list[tuple[str, list[str]]] = []
        self._fetched = 0.0

    def targets(self, kind: str) -> list[str]:
        now = time.monotonic()
        if now - self._fetched > ENDPOINTS_TTL:
            self._endpoints = [(e["name"], e["events"]) for e in self.store.endpoints() if e["enabled"]]
            self._fetched = now
        return [name for name, patterns in self._endpoints if matches(patterns, kind)]

    def emit(self, kind: str, payload_json: str) -> str:
        event_id = new_event_id()
        with self.lock:
            self.store.emit(event_id, kind, payload_json, self.targets(kind))
        return event_id


_outboxes: dict[Path, _Outbox] = {}
_outboxes_lock = threading.Lock()


def emit(kind: str, payload: Any = None, *, db: str | os.PathLike[str] | None = None) -> str:
    """Record an event for webhook delivery and return its id (the `webhook-id` receivers see).

    Durable when this returns; delivery happens later, on the primary, at least once.
    Safe from any worker, thread or job. Raises TypeError for a payload JSON cannot encode.
    """
    if not kind or not isinstance(kind, str):
        raise ValueError("emit() needs an event type, like 'app.order_created'")
    payload_json = json.dumps({} if payload is None else payload, separators=(",", ":"))
    where = db or os.environ.get("CLUSTERCTL_DB")
    if not where:
        raise RuntimeError("emit() needs the store: run under clusterctl-tui (CLUSTERCTL_DB) or pass db=")
    path = Path(where)
    with _outboxes_lock:
        outbox = _outboxes.get(path)
        if outbox is None:
            outbox = _outboxes[path] = _Outbox(path)
    return outbox.emit(kind, payload_json)
