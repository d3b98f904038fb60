"""clusterctl-tui's engine: the primary of a pre-fork cluster, headless or under the console.

No Textual import anywhere in this package. Names are imported on first use,
so `from runtime import emit` in a worker stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ClusterSnapshot": "snapshot",
    "ConfigError": "config",
    "EmitError": "outbox",
    "Event": "events",
    "EventBus": "events",
    "Primary": "primary",
    "ReloadFailed": "errors",
    "ReloadSnapshot": "snapshot",
    "Settings": "config",
    "StartupError": "primary",
    "WorkerSnapshot": "snapshot",
    "emit": "outbox",
    "emit_async": "outbox",
    "load_settings": "config",
}

__all__ = [
    "ClusterSnapshot",
    "ConfigError",
    "EmitError",
    "Event",
    "EventBus",
    "Primary",
    "ReloadFailed",
    "ReloadSnapshot",
    "Settings",
    "StartupError",
    "WorkerSnapshot",
    "emit",
    "emit_async",
    "load_settings",
]

if TYPE_CHECKING:
    from .config import ConfigError, Settings, load_settings
    from .errors import ReloadFailed
    from .events import Event, EventBus
    from .outbox import EmitError, emit, emit_async
    from .primary import Primary, StartupError
    from .snapshot import ClusterSnapshot, ReloadSnapshot, WorkerSnapshot


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
