"""Small, pure formatting helpers for the console's cells."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"
STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "draining": "cyan",
    "backoff": "bold white on red",
}
STATUS_STYLES = {
    "succeeded": "green",
    "delivered": "green",
    "running": "yellow",
    "pending": "yellow",
    "failed": "bold red",
    "timed_out": "bold red",
    "dead": "bold white on red",
    "abandoned": "magenta",
    "skipped": "dim",
}


def spark(values: Sequence[float], width: int) -> str:
    """A unicode sparkline of the last `width` values, scaled to their own maximum."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    top = max(tail) or 1.0
    return "".join(BLOCKS[min(8, round(v / top * 8))] for v in tail).rjust(width)


def size(num_bytes: int) -> str:
    if not num_bytes:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit in ("B", "K", "M") else f"{value:.1f}G"
        value /= 1024
    return f"{value:.1f}G"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def until(iso: str | None, now: datetime | None = None) -> str:
    if not iso:
        return "-"
    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return "in " + duration((when - (now or datetime.now(UTC))).total_seconds())


def styled(value: str, style: str) -> Text:
    """Styled cell text. The style goes on a span: DataTable shifts Text whose base style is set."""
    return Text.assemble((value, style))


def state(value: str) -> Text:
    return styled(value, STATE_STYLES.get(value, ""))


def status(value: str | None) -> Text:
    return styled(value or "-", STATUS_STYLES.get(value or "", "dim"))


def number(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value else "-"
