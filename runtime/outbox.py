"""The outbox: `emit()` from app code in any process, and the Standard Webhooks wire format.

`emit(type, payload)` writes the event and one pending delivery per matching
endpoint to the store in one transaction and returns the event id at once; it
never touches the network. Only the primary delivers (`runtime.webhooks`).
The endpoints and their event filters are read from the store, where the
primary publishes them at start; secrets never leave the primary.

An emitting process follows the store file: if it was replaced (deleted and
recreated by the primary), the next `emit()` writes to the new file, never to
the old one where nobody would read it. When the store is PostgreSQL
(CLUSTERCTL_DB is its URL), `emit()` writes there, and an unreachable database
is an EmitError, never a silent loss; the next call connects again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .store import BUSY_TIMEOUT_MS, STORE_ERRORS, StoreError, is_busy, open_store_url, store_label

ENDPOINTS_TTL = 1.0  # seconds an emitting process trusts its cached endpoint list
# How long emit() may wait for the store's write lock when it is called on an event loop: every
# request the worker serves waits with it, so it gives up soon and says so instead.
EVENT_LOOP_WAIT_MS = 200


class EmitError(Exception):
    """The event was not recorded (the store is locked, missing or failing); the message names the store."""


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


def resolve_secret(reference: str, webhook: str, environ: Mapping[str, str] | None = None) -> bytes:
    """`env:NAME` (from `environ`, default os.environ), `file:PATH` or a literal `whsec_<base64>` → the key bytes."""
    if reference.startswith("env:"):
        name = reference[4:]
        value = (os.environ if environ is None else environ).get(name)
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
    """One per process and store (a path or a URL): a connection and a short-lived cache of endpoint filters."""

    def __init__(self, where: str, wait_ms: int) -> None:
        # Never creates or migrates the schema, for the reason `_follow_file` gives: the primary does that.
        self.where = where
        self.store = open_store_url(where, busy_timeout_ms=wait_ms, prepare=False)
        self.lock = threading.Lock()
        self._endpoints: list[tuple[str, list[str]]] = []
        self._fetched = 0.0

    def targets(self, kind: str) -> list[str]:
        now = time.monotonic()
        if now - self._fetched > ENDPOINTS_TTL:
            self._endpoints = [(e["name"], e["events"]) for e in self.store.endpoints() if e["enabled"]]
            self._fetched = now
        return [name for name, patterns in self._endpoints if matches(patterns, kind)]

    def emit(self, kind: str, payload_json: str, wait_ms: int) -> str:
        with _holding(self.lock, wait_ms):
            self.store.set_busy_timeout(wait_ms)
            self._follow_file()
            event_id = new_event_id()
            self.store.emit(event_id, kind, payload_json, self.targets(kind))
        return event_id

    def _follow_file(self) -> None:
        """Checked on every emit (one stat): an event written to a deleted file is lost without a word.

        A missing file is not recreated here: the primary does that and publishes the endpoints with it,
        and an event written to a store without its endpoints would never be delivered.
        """
        problem = self.store.file_problem()
        if problem is None:
            return
        if not Path(self.where).exists():
            raise StoreError(f"{problem}, and the primary has not created a new one yet")
        self.store.reopen(prepare=False)
        self._fetched = 0.0  # the endpoints of the new file, not the cached ones of the old


_outboxes: dict[str, _Outbox] = {}
_outboxes_lock = threading.Lock()


@contextlib.contextmanager
def _holding(lock: threading.Lock, wait_ms: int) -> Iterator[None]:
    """Threads of a process share its outboxes: waiting for one counts against the same limit as the store's lock."""
    if not lock.acquire(timeout=wait_ms / 1000):
        raise TimeoutError("another thread of this process is writing to it")
    try:
        yield
    finally:
        lock.release()


def _prepare(kind: str, payload: Any, db: str | os.PathLike[str] | None) -> tuple[str, str]:
    if not kind or not isinstance(kind, str):
        raise ValueError("emit() needs an event type, like 'app.order_created'")
    payload_json = json.dumps({} if payload is None else payload, separators=(",", ":"))
    where = db or os.environ.get("CLUSTERCTL_DB")
    if not where:
        raise RuntimeError("emit() needs the store: run under clusterctl-tui (CLUSTERCTL_DB) or pass db=")
    return os.fspath(where), payload_json


def _write(where: str, kind: str, payload_json: str, on_event_loop: bool) -> str:
    wait_ms = EVENT_LOOP_WAIT_MS if on_event_loop else BUSY_TIMEOUT_MS
    try:
        with _holding(_outboxes_lock, wait_ms):
            outbox = _outboxes.get(where)
            if outbox is None:
                outbox = _outboxes[where] = _Outbox(where, wait_ms)
        return outbox.emit(kind, payload_json, wait_ms)
    except STORE_ERRORS as exc:
        if is_busy(exc) or isinstance(exc, TimeoutError):
            reason = f"it stayed locked by another writer for {wait_ms / 1000:g}s"
            if on_event_loop:
                reason += " (the limit on an event loop; `await emit_async(...)` waits longer without blocking it)"
        else:
            reason = str(exc)
        raise EmitError(f"event {kind!r} was NOT recorded in store {store_label(where)}: {reason}") from exc


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def emit(kind: str, payload: Any = None, *, db: str | os.PathLike[str] | None = None) -> str:
    """Record an event for webhook delivery and return its id (the `webhook-id` receivers see).

    Durable when this returns; delivery happens later, on the primary, at least once.
    Safe from any worker, thread or job. Raises TypeError for a payload JSON cannot encode.

    If the event cannot be recorded, this raises EmitError, never returns: an event is not
    lost without an exception. Another process may hold the store's write lock for a moment;
    from a plain thread (a WSGI view, a job) emit() waits for it up to 10 s. Called on a
    running event loop (an async view; the whole worker waits with it) it waits at most
    0.2 s and then raises EmitError; use `await emit_async(...)` there to wait the full time
    without blocking the loop.
    """
    where, payload_json = _prepare(kind, payload, db)
    return _write(where, kind, payload_json, _on_event_loop())


async def emit_async(kind: str, payload: Any = None, *, db: str | os.PathLike[str] | None = None) -> str:
    """`emit()` for async code: the write runs in a thread and may wait the full 10 s for the lock,
    while the event loop goes on serving. Durable when it returns; raises EmitError if the event
    was not recorded. A task cancelled while awaiting this may still have recorded its event."""
    where, payload_json = _prepare(kind, payload, db)  # now, so the event is the payload as it is at the call
    return await asyncio.to_thread(_write, where, kind, payload_json, False)
