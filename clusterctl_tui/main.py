"""Entry points: `clusterctl-tui` on a terminal (a launcher and a primary with its console) and `attach`.

Interactive, `clusterctl-tui` is two processes. The launcher is what the shell
started: it owns the terminal session and does nothing but wait. The primary,
with the console in its event loop, runs in a session of its own and draws on
the launcher's terminal. `d` (detach) closes the console and ends the
launcher, so the shell gets its prompt back, while the primary goes on
serving, its output now in `logs/primary.log`. Losing the terminal (an SSH
session that drops) hangs up the launcher's session only: the launcher tells
the primary, which detaches the same way. No process that runs threads is ever
forked: the primary is a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from console.app import DETACH, ClusterConsole
from console.remote import RemoteBackend
from runtime import Primary, Settings, StartupError
from runtime.cli import Entry
from runtime.cli import main as runtime_main
from runtime.control import live_sockets
from runtime.headless import format_event

LAUNCHER_FD = "CLUSTERCTL_LAUNCHER_FD"  # set in the primary's environment: where to say "detached"
DETACHED = b"d"


def main(argv: list[str] | None = None) -> None:
    runtime_main(argv, Entry(console=run_console, attach=attach))


def run_console(settings: Settings, bare: bool) -> int:
    """`clusterctl-tui [up]` with a terminal: attach to this store's primary (bare only), or start one."""
    if bare and live_sockets(settings.store.path):
        return attach(settings.store.path, None)
    fd = os.environ.pop(LAUNCHER_FD, None)
    if fd is None:
        return _launch()
    return asyncio.run(_primary_with_console(settings, int(fd)))


def attach(store: Path, socket: Path | None) -> int:
    # `up` ignores HUP until a primary handles it; an attached console is no primary: it ends with its terminal.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("clusterctl-tui: error: attach needs a terminal (use `status` or `logs -f` in scripts)", file=sys.stderr)
        return 2
    app = ClusterConsole(RemoteBackend(store, socket), attached=True)
    code = app.run()
    if app.error:
        print(f"clusterctl-tui: error: {app.error}", file=sys.stderr)
    return code if isinstance(code, int) else 0


# ---------------------------------------------------------------- the launcher


def _launch() -> int:
    """Start the primary in its own session on this terminal, and wait until it exits or detaches."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "clusterctl_tui", *sys.argv[1:]],
        pass_fds=(write_end,),
        env={**os.environ, LAUNCHER_FD: str(write_end)},
        start_new_session=True,  # the terminal's hang-up is not the primary's
    )
    os.close(write_end)

    def forward(sig: int, _frame: object) -> None:
        os.kill(child.pid, sig)

    def hang_up(_sig: int, _frame: object) -> None:
        os.kill(child.pid, signal.SIGUSR1)  # the terminal is gone: detach, never stop
        os._exit(129)

    signal.signal(signal.SIGWINCH, forward)  # only the terminal's foreground group hears a resize
    signal.signal(signal.SIGINT, forward)  # Ctrl+C before the console takes the keyboard
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, hang_up)
    said = b""
    while chunk := os.read(read_end, 64):
        said += chunk
    if DETACHED in said:
        print(
            f"clusterctl-tui: detached; the primary (pid {child.pid}) keeps serving. "
            "`clusterctl-tui attach` brings the console back.",
            file=sys.stderr,
        )
        return 0
    return child.wait()


# ---------------------------------------------------------------- the primary, with its console


async def _primary_with_console(settings: Settings, launcher: int) -> int:
    primary = Primary(settings)
    app = ClusterConsole(primary, detachable=True)

    def terminal_gone() -> None:
        # The console's last writes (restoring the terminal) go nowhere rather than to a dead tty.
        _redirect(os.open(os.devnull, os.O_WRONLY))
        app.outcome = DETACH
        app.exit(0)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, terminal_gone)
    try:
        code = await app.run_async()
    except Exception as exc:  # the console failed: the cluster it runs must not go with it
        print(f"clusterctl-tui: the console failed ({exc!r}); detaching", file=sys.stderr)
        code = 0
    alive = primary.running or (app.starting is not None and not app.starting.done())
    if app.outcome != DETACH and not alive:  # quit (the cluster stopped), or it never started
        os.close(launcher)
        if app.error:
            print(f"clusterctl-tui: error: {app.error}", file=sys.stderr)
        return code if isinstance(code, int) else 0
    _leave_terminal(settings)
    primary.events.subscribe(lambda event: print(format_event(event), file=sys.stderr, flush=True))
    with contextlib.suppress(OSError):  # the launcher is gone already if the terminal is
        os.write(launcher, DETACHED)
    os.close(launcher)
    if app.starting is not None:
        try:
            await app.starting
        except StartupError as exc:
            print(f"clusterctl-tui: error: {exc}", file=sys.stderr)
            return 2
    if primary.running:
        await primary.wait()
    return 0


def _leave_terminal(settings: Settings) -> None:
    """Stop using the terminal: stdin from /dev/null, stdout and stderr to logs/primary.log beside the store."""
    logs = settings.store.path.parent / "logs"
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    _redirect(os.open(logs / "primary.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))


def _redirect(out: int) -> None:
    """stdin from /dev/null, stdout and stderr to `out` (which this closes): off the terminal."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
