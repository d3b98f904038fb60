"""systemd: what the primary tells its service manager, what it takes from it, and the unit files.

- Notify (`Notifier`, `ServiceNotifier`): when `NOTIFY_SOCKET` is set, `READY=1` once the first
  workers are ready, `RELOADING=1`/`READY=1` around a rolling restart, `STOPPING=1`, readable
  `STATUS=` lines and `WATCHDOG=1` pings. sd_notify is one datagram to an AF_UNIX socket, so there
  is no dependency; a send that fails is dropped, never fatal.
- Socket activation (`listen_fds`): the descriptors systemd passed (`LISTEN_FDS`, from fd 3), which
  `runtime.listeners.inherit` turns into the cluster's listener.
- Units (`render_units`): what `clusterctl-tui systemd-unit [--socket]` prints.

Every variable systemd meant for us is removed from `os.environ` as it is read: workers, jobs and
before_start inherit that environment, and none of them may speak for the service (nor mistake
fd 3 for a socket of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import pwd
import re
import socket
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from .channel import BACKLOG
from .config import ConfigError, Settings, parse_bind
from .events import Event

if TYPE_CHECKING:
    from .primary import Primary

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: systemd passes sockets from fd 3 on, in order
STATUS_INTERVAL = 1.0  # seconds: STATUS= at most this often (systemd keeps only the last one anyway)
UNIT_NAME = "clusterctl-tui"
WATCHDOG_SEC = 30
STOP_MARGIN = 15  # seconds beyond graceful_timeout before systemd's SIGKILL: lifespan shutdown, the kill grace


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> list[int]:
    """The descriptors systemd passed to this process (3, 4, ...), or [] when none were meant for us.

    `LISTEN_PID` must be our pid: variables inherited from a parent that was socket-activated
    describe its descriptors, not ours. The variables are removed either way (sd_listen_fds with
    unset_environment), so no child of ours reads them.
    """
    count = environ.pop("LISTEN_FDS", None)
    pid = environ.pop("LISTEN_PID", None)
    environ.pop("LISTEN_FDNAMES", None)
    try:
        if count is None or pid is None or int(pid) != os.getpid():
            return []
        return list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(0, int(count))))
    except ValueError:
        return []


class Notifier:
    """sd_notify: each message is one datagram to the socket `NOTIFY_SOCKET` names."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval  # seconds between WATCHDOG=1, or None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Never wait on systemd from the supervising loop: a full queue drops the message instead.
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier | None:
        """A notifier when `NOTIFY_SOCKET` is set, else None; takes the variables out of `environ`."""
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        watchdog_pid = environ.pop("WATCHDOG_PID", None)
        if not address:
            return None
        interval = None
        with contextlib.suppress(ValueError):
            # WATCHDOG_PID names the process systemd watches; a ping from any other is not wanted.
            if usec is not None and int(usec) > 0 and (watchdog_pid is None or int(watchdog_pid) == os.getpid()):
                interval = int(usec) / 2_000_000  # half the timeout, as sd_watchdog_enabled(3) advises
        return cls(address, interval)

    def send(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields as one message; False when it could not be sent (ignored by callers)."""
        # STATUS= text ends at a newline: one in the text would start a field of its own.
        message = "\n".join(field.replace("\n", " ") for field in fields)
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()


class ServiceNotifier:
    """What the primary tells systemd, and when: the notify protocol's policy over a `Notifier`.

    State changes go out at once, each with the status line that explains it; a STATUS= on its own
    goes out at most once a second. Reloads are observed on the event bus, so a rolling restart
    started by HUP, `reload` or the console is announced the same way. The watchdog pings come from
    a task on the primary's own loop: a primary whose loop stalls stops pinging, and systemd
    restarts it.
    """

    def __init__(self, notifier: Notifier, primary: Primary) -> None:
        self.notifier = notifier
        self.primary = primary
        self._ready = False
        self._stopping = False
        self._last_status = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe = primary.events.subscribe(self._on_event)

    @classmethod
    def attach(cls, primary: Primary) -> ServiceNotifier | None:
        """Start speaking for `primary` when systemd listens (NOTIFY_SOCKET set), else None.

        Call before the primary starts any child: the variables leave `os.environ` here.
        """
        notifier = Notifier.from_environ()
        if notifier is None:
            return None
        service = cls(notifier, primary)
        loop = asyncio.get_running_loop()
        # From the very start: a slow app import or before_start must not look like a hung primary.
        if notifier.watchdog_interval is not None:
            service._tasks.append(loop.create_task(service._watchdog(notifier.watchdog_interval)))
        service._tasks.append(loop.create_task(service._status_updates()))
        return service

    def ready(self) -> None:
        """The first workers are all ready: the service is up."""
        self._ready = True
        self._send_state("READY=1")

    def stopping(self) -> None:
        self._stopping = True
        self._send_state("STOPPING=1")

    def close(self) -> None:
        self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        self.notifier.close()

    def status(self) -> str:
        """One line for `systemctl status`: where, how many workers are ready, which generation."""
        primary = self.primary
        if primary.supervisor is None or primary.listener is None:
            return "stopping" if self._stopping else "starting"
        snap = primary.snapshot()
        ready = len({w.id for w in snap.workers if w.state == "ready" and w.id <= snap.desired_workers})
        if self._stopping:
            alive = sum(1 for w in snap.workers if w.pid is not None)
            return f"stopping: draining {alive} worker{'s' if alive != 1 else ''}" if alive else "stopping"
        if not self._ready:
            return f"starting on {snap.bind}: {ready}/{snap.desired_workers} workers ready"
        text = f"serving on {snap.bind}: {ready}/{snap.desired_workers} workers ready, generation {snap.generation}"
        reload = snap.reload
        if reload is not None and reload.state == "running":
            text += f"; rolling restart to generation {reload.generation}: {reload.done}/{reload.total} replaced"
        elif reload is not None and reload.state == "failed":
            text += f"; the last rolling restart rolled back: {reload.error}"
        return text

    def _on_event(self, event: Event) -> None:
        # Before READY=1 a reload is part of start-up to systemd; after STOPPING=1 nothing is ready again.
        if self._ready and not self._stopping:
            if event.kind == "cluster.reload_started":
                # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an older one.
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                self._send_state("RELOADING=1", f"MONOTONIC_USEC={usec}")
            elif event.kind in ("cluster.reloaded", "cluster.reload_failed"):
                # A rolled-back restart leaves the old workers serving: the service is ready all the same.
                self._send_state("READY=1")

    def _send_state(self, *fields: str) -> None:
        """A state change goes out at once, with the status that explains it."""
        status = self._status_or_none()
        if status is not None:
            self._last_status = status
            fields = (*fields, f"STATUS={status}")
        self.notifier.send(*fields)

    def _status_or_none(self) -> str | None:
        try:
            return self.status()
        except Exception:  # a status line is never worth failing the primary for
            return None

    async def _status_updates(self) -> None:
        # Looked at once a second rather than on each event: the counts change without one (a worker
        # that stops responding), and a burst of events (a scale to 32) still makes one line.
        while True:
            status = self._status_or_none()
            if status is not None and status != self._last_status:
                self._last_status = status
                self.notifier.send(f"STATUS={status}")
            await asyncio.sleep(STATUS_INTERVAL)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)


# ---------------------------------------------------------------------- unit files


def render_units(settings: Settings, up_flags: list[str], with_socket: bool, cwd: Path | None = None) -> str:
    """The service unit that runs this config headless under systemd, and with `with_socket` its socket unit.

    `up_flags` are the `up` flags given on the command line (`--app`, `--bind`, `--workers`), passed on as typed.
    """
    cwd = (cwd or Path.cwd()).resolve()
    text = f"# ---- {UNIT_NAME}.service ----\n" + _service_unit(settings, up_flags, with_socket, cwd)
    if with_socket:
        text += f"\n# ---- {UNIT_NAME}.socket ----\n" + _socket_unit(settings, cwd)
    return text


def _service_unit(settings: Settings, up_flags: list[str], with_socket: bool, cwd: Path) -> str:
    argv = [sys.executable, "-m", "clusterctl_tui", "up", "--headless"]
    if settings.source is not None:
        argv += ["--config", str((cwd / settings.source).resolve())]
    argv += ["--db", str((cwd / settings.store.path).resolve()), *up_flags]
    after = "network.target" + (f" {UNIT_NAME}.socket" if with_socket else "")
    lines = [
        "[Unit]",
        f"Description={_escape(f'clusterctl-tui: {settings.app.target} on {settings.server.bind}')}",
        f"After={after}",
    ]
    if with_socket:
        lines.append(f"Requires={UNIT_NAME}.socket")
    lines += [
        "",
        "[Service]",
        "Type=notify",
        # Only the primary speaks for the service; it also keeps NOTIFY_SOCKET from its children.
        "NotifyAccess=main",
        f"ExecStart={' '.join(_exec_arg(arg) for arg in argv)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        # TERM to the primary alone (it drains its workers), KILL to everything left at the timeout.
        "KillMode=mixed",
        f"TimeoutStopSec={math.ceil(settings.server.graceful_timeout) + STOP_MARGIN}",
        f"WatchdogSec={WATCHDOG_SEC}",
        "Restart=on-failure",
        f"WorkingDirectory={_escape(str(cwd))}",
    ]
    if os.geteuid() != 0:
        # The account that generated the unit owns the virtualenv and the store; not root by default.
        lines.append(f"User={_escape(pwd.getpwuid(os.geteuid()).pw_name)}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _socket_unit(settings: Settings, cwd: Path) -> str:
    bind = settings.server.bind
    target = parse_bind(bind)
    lines = [
        "[Unit]",
        f"Description={_escape(f'clusterctl-tui: listening socket for {settings.app.target}')}",
        f"PartOf={UNIT_NAME}.service",
        "",
        "[Socket]",
    ]
    if isinstance(target, str):
        lines.append(f"ListenStream={_escape(str((cwd / target).resolve()))}")
        lines.append(f"SocketMode={settings.server.socket_mode:04o}")
    else:
        host, port = target
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"systemd-unit --socket: ListenStream= needs an IP address, got {bind!r}") from None
        if port == 0:
            raise ConfigError(f"systemd-unit --socket: ListenStream= needs a fixed port, got {bind!r}")
        shown = f"[{address}]" if address.version == 6 else str(address)
        lines.append(f"ListenStream={shown}:{port}")
    lines += [f"Backlog={BACKLOG}", "", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def _escape(value: str) -> str:
    """A value systemd would otherwise expand: `%` starts a specifier."""
    return value.replace("%", "%%")


def _exec_arg(arg: str) -> str:
    """One ExecStart= word: `$` and `%` escaped, quoted when systemd would split or unescape it."""
    arg = _escape(arg).replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
