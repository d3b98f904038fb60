"""The live feed an attached console reads from a primary: typed messages, encoded and decoded here only.

A feed is a control-socket command (`subscribe`) whose answer goes on: one
JSON line per message, `{"t": <kind>, "v": <value>}`, until either side
closes. The kinds:

- `snapshot`: the whole `ClusterSnapshot`, about once a second;
- `events`: a batch of `Event`s, as they happen (batched ten times a second);
- `logs`: a batch of worker `LogLine`s (batched the same way);
- `bye`: the primary is stopping; the value says why.

Values are dataclasses, encoded field by field and rebuilt from their type
hints, so the attached console works on the very types the in-process one
does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, TypeVar

from .events import Event
from .logs import LogLine
from .snapshot import ClusterSnapshot

T = TypeVar("T")

SNAPSHOT = "snapshot"
EVENTS = "events"
LOGS = "logs"
BYE = "bye"


def encode(value: Any) -> Any:
    """A dataclass (or a container of them) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    return value


def decode(kind: Any, data: Any) -> Any:
    """Rebuild a value of type `kind` from what `encode` made; ValueError if it does not fit."""
    if data is None:
        return None
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise ValueError(f"{kind.__name__}: expected an object")
        hints = _hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.init}
        return kind(**{name: decode(hints[name], value) for name, value in data.items() if name in known})
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        return decode(options[0], data) if len(options) == 1 else data
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(decode(item, value) for value in data)
    if origin is list:
        return [decode(args[0] if args else Any, value) for value in data]
    if origin is dict:
        return {key: decode(args[1] if args else Any, value) for key, value in data.items()}
    return data


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def message(kind: str, value: Any) -> bytes:
    return json.dumps({"t": kind, "v": encode(value)}, separators=(",", ":")).encode() + b"\n"


_TYPES: dict[str, Any] = {
    SNAPSHOT: ClusterSnapshot,
    EVENTS: list[Event],
    LOGS: list[LogLine],
    BYE: str,
}


def read_message(line: bytes) -> tuple[str, Any]:
    """(kind, value) of one feed line; ValueError for a line this version cannot read."""
    data = json.loads(line)
    if not isinstance(data, dict) or data.get("t") not in _TYPES:
        raise ValueError(f"not a feed message: {line[:80]!r}")
    kind = data["t"]
    return kind, decode(_TYPES[kind], data.get("v"))
