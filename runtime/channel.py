"""What the primary, its fork servers and its workers agree on: every message that crosses between them.

Kept apart from `runtime.worker` so the primary never imports the worker's
module (a worker runs it as `__main__`, or is forked from a fork server that
imported it).

Three conversations, each a set of frozen dataclasses, encoded here and
decoded here, so no other module reads a message by string keys:

- the worker channel (a unix socketpair, JSON lines). Worker → primary:
  `Boot` (app loaded, health socket open), `Ready` (accepting), `Heartbeat`
  (cumulative counters), `Fatal` (cannot start: the error), `Drained` (in-flight
  work done, exiting). Primary → worker: `Accept` (the health check passed; a
  worker with none to pass accepts at boot), `Drain`;
- the worker's start-up orders: a `WorkerSpec` (JSON in `SPEC_ENV` for a fresh
  interpreter, inside a `SpawnRequest` for a fork server);
- the fork server's channel (a SOCK_SEQPACKET pair, one JSON message per
  packet, descriptors alongside with SCM_RIGHTS). Fork server → primary:
  `ForkServerHello` once, then `Spawned` or `SpawnFailed` per `SpawnRequest`.

`decode` refuses anything that is not exactly one of the expected messages
(bad JSON, an unknown kind, a missing field, a field of the wrong type) with
`MalformedMessage`: the reader skips that one and reads on.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

SPEC_ENV = "CLUSTERCTL_WORKER_SPEC"  # a fresh interpreter's WorkerSpec, as JSON
# The listen backlog of the shared sockets: the primary's listen(), systemd's socket unit, and a
# worker's own server on a duplicate descriptor (whose listen() sets it again for the shared socket).
BACKLOG = 2048
EXIT_BOOT_ERROR = 3  # the app could not be loaded; retrying right away will not help
EXIT_PRIMARY_GONE = 70


def describe_exit(code: int) -> str:
    """An exit status in words (Popen's convention: -N for a death by signal N)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def health_socket_name(primary_pid: int, worker_pid: int) -> str:
    """Abstract unix socket (no file to clean up) on which a worker answers the primary's health check."""
    return f"\0clusterctl/{primary_pid}/{worker_pid}/health"


class MalformedMessage(ValueError):
    """Bytes that are not one of the messages this side expects."""


# ---------------------------------------------------------------- worker → primary


@dataclass(frozen=True)
class Boot:
    KIND: ClassVar[str] = "boot"
    interface: str  # asgi3 | asgi2 | wsgi, as detected


@dataclass(frozen=True)
class Ready:
    KIND: ClassVar[str] = "ready"


@dataclass(frozen=True)
class Heartbeat:
    """Cumulative since the worker started, so a lost heartbeat costs nothing."""

    KIND: ClassVar[str] = "hb"
    by_class: tuple[int, ...]  # requests by status class 0-5 (0: no response)
    histogram: tuple[int, ...]  # latency buckets of runtime.metrics
    in_flight: int
    connections: int


@dataclass(frozen=True)
class Fatal:
    KIND: ClassVar[str] = "fatal"
    error: str


@dataclass(frozen=True)
class Drained:
    """Every request answered and the lifespan shut down: what follows is the interpreter's own exit."""

    KIND: ClassVar[str] = "drained"


# ---------------------------------------------------------------- primary → worker


@dataclass(frozen=True)
class Accept:
    KIND: ClassVar[str] = "accept"


@dataclass(frozen=True)
class Drain:
    KIND: ClassVar[str] = "drain"


WorkerMessage = Boot | Ready | Heartbeat | Fatal | Drained
PrimaryMessage = Accept | Drain


# ---------------------------------------------------------------- a worker's orders


@dataclass(frozen=True)
class WorkerSpec:
    """How to run one worker. Descriptor numbers are the worker's own (see `fds` and `with_fds`)."""

    target: str
    interface: str
    channel_fd: int
    listen_fds: tuple[int, ...]
    board_fd: int
    board_index: int
    heartbeat_interval: float
    keepalive_timeout: float
    header_timeout: float
    graceful_timeout: float
    forwarded_allow_ips: tuple[str, ...] | None  # None: uvicorn's default
    access_log: bool
    accept_at_boot: bool  # no health check to pass first: accept without waiting for `Accept`

    def to_json(self) -> str:
        return json.dumps(_fields(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerSpec:
        return _build(cls, _load(text))

    def fds(self) -> list[int]:
        """The descriptors the worker needs, in the order `with_fds` takes them back."""
        return [self.channel_fd, self.board_fd, *self.listen_fds]

    def with_fds(self, fds: list[int]) -> WorkerSpec:
        """The same spec in a process where `self.fds()` arrived as `fds` (SCM_RIGHTS renumbers them)."""
        if len(fds) != 2 + len(self.listen_fds):
            raise MalformedMessage(f"expected {2 + len(self.listen_fds)} descriptors, got {len(fds)}")
        return dataclasses.replace(self, channel_fd=fds[0], board_fd=fds[1], listen_fds=tuple(fds[2:]))


# ---------------------------------------------------------------- the fork server's channel


@dataclass(frozen=True)
class SpawnRequest:
    """Fork a worker. Descriptors come with it: `spec.fds()`, then its stdout and stderr."""

    KIND: ClassVar[str] = "spawn"
    slot: int
    spec: WorkerSpec
    env: dict[str, str]  # the worker's whole environment


@dataclass(frozen=True)
class ForkServerHello:
    """Sent once, when the fork server is ready to fork (or knows it never will: `error`)."""

    KIND: ClassVar[str] = "hello"
    pid: int
    preloaded: bool
    error: str | None


@dataclass(frozen=True)
class Spawned:
    KIND: ClassVar[str] = "spawned"
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    KIND: ClassVar[str] = "spawn_failed"
    error: str


ForkServerMessage = ForkServerHello | Spawned | SpawnFailed


# ---------------------------------------------------------------- encode / decode

M = TypeVar("M")


def encode(message: Any) -> bytes:
    """One message as a JSON line (the framing of the worker channel; a packet's payload on the fork server's)."""
    return json.dumps({"t": message.KIND, **_fields(message)}, separators=(",", ":")).encode() + b"\n"


def decode(data: bytes, expected: Any) -> Any:
    """The message in `data`, one of the union `expected` (WorkerMessage, PrimaryMessage, ...).

    MalformedMessage if it is anything else.
    """
    raw = _load(data)
    kinds = {cls.KIND: cls for cls in typing.get_args(expected) or (expected,)}
    cls = kinds.get(raw.pop("t", None))
    if cls is None:
        raise MalformedMessage(f"not one of {sorted(kinds)}: {_preview(data)}")
    return _build(cls, raw)


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return _fields(value)
    return value


def _load(data: str | bytes) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except ValueError:
        raise MalformedMessage(f"not JSON: {_preview(data)}") from None
    if not isinstance(raw, dict):
        raise MalformedMessage(f"not a JSON object: {_preview(data)}")
    return raw


def _preview(data: str | bytes) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return repr(text[:80])


_HINTS: dict[type, dict[str, Any]] = {}


def _build(cls: type[M], raw: dict[str, Any]) -> M:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if raw.keys() != hints.keys():
        missing, extra = sorted(hints.keys() - raw.keys()), sorted(raw.keys() - hints.keys())
        raise MalformedMessage(f"{cls.__name__}: missing {missing}, unexpected {extra}")
    return cls(**{name: _check(raw[name], hint, f"{cls.__name__}.{name}") for name, hint in hints.items()})


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` says (JSON arrays become tuples), or MalformedMessage."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(value, option, where)
            except MalformedMessage:
                continue
        raise MalformedMessage(f"{where}: unexpected {value!r}")
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            raise MalformedMessage(f"{where}: expected a list, got {value!r}")
        return tuple(_check(v, item, where) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MalformedMessage(f"{where}: expected an object, got {value!r}")
        return _build(hint, value)
    else:  # a type this module does not send
        raise TypeError(f"{where}: no check for {hint!r}")
    if not ok:
        raise MalformedMessage(f"{where}: unexpected {value!r}")
    return value
