"""clusterctl-tui's engine: the primary of a pre-fork cluster, headless or under the console.

No Textual import anywhere in this package.
"""

from .config import ConfigError, Settings, load_settings
from .events import Event, EventBus
from .outbox import emit
from .primary import Primary, StartupError
from .snapshot import ClusterSnapshot, ReloadSnapshot, WorkerSnapshot
from .supervisor import ReloadFailed

__all__ = [
    "ClusterSnapshot",
    "ConfigError",
    "Event",
    "EventBus",
    "Primary",
    "ReloadFailed",
    "ReloadSnapshot",
    "Settings",
    "StartupError",
    "WorkerSnapshot",
    "emit",
    "load_settings",
]
