"""`clusterctl-tui up --headless`: the primary without the console; event lines and worker output on stderr.

Worker lines go to stderr as `w<slot>[<pid>] <text>` (journald stamps them), so `journalctl` shows an
app's tracebacks; `WorkerLogs` writes them from a thread of its own, never from the event loop.
"""

from __future__ import annotations

import sys
from datetime import datetime

from .config import Settings
from .control import socket_path
from .events import Event
from .primary import Primary, StartupError

EXIT_BAD_INPUT = 2


def format_event(event: Event) -> str:
    when = datetime.fromtimestamp(event.at).strftime("%Y-%m-%d %H:%M:%S")
    who = f" worker {event.worker_id} (pid {event.pid})" if event.worker_id is not None else ""
    return f"{when} {event.kind}{who}: {event.message}"


async def run_headless(settings: Settings) -> int:
    primary = Primary(settings)
    primary.echo = sys.stderr.fileno()
    primary.events.subscribe(lambda event: print(format_event(event), file=sys.stderr, flush=True))
    try:
        await primary.start()
    except StartupError as exc:
        print(f"clusterctl-tui: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not primary.running:  # told to stop while starting: already drained
        return 0
    control = socket_path(settings.store.path, primary.pid)
    print(f"clusterctl-tui: control socket {control}", file=sys.stderr, flush=True)
    await primary.wait()
    return 0
