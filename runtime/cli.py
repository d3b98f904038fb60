"""The `clusterctl-tui` command.

`up` starts a primary (with the console, or `--headless`); the other commands
talk to a running primary through its control socket. Bad input of any kind
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil

from .commands import COMMANDS, whole
from .config import MAX_WORKERS, ConfigError, Settings, load_settings, parse_workers
from .control import ControlError, Interrupted, NoPrimary, request, resolve_socket

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_RUNNING = 3  # LSB: a script can tell "down" from "broken"
EXIT_BROKEN_PIPE = 141  # what a shell reports for a writer killed by SIGPIPE, as `git log | head -1` is
# The primary's commands (runtime.commands) plus those that need no primary.
CLI_COMMANDS = {name for name, command in COMMANDS.items() if command.cli} | {
    "up",
    "attach",
    "check",
    "history",
    "webhooks",
    "logs",
    "systemd-unit",
}


@dataclass(frozen=True)
class Entry:
    """What needs the console, handed in by the `clusterctl-tui` entry point (which knows both packages).

    `console(settings, bare)` runs the primary with its console (`bare`: no command was typed, so an
    already running primary is attached to instead); `attach(store, socket)` is `clusterctl-tui attach`.
    """

    console: Callable[[Settings, bool], int] | None = None
    attach: Callable[[Path, Path | None], int] | None = None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterctl-tui",
        description="Run a Python web app as a supervised pre-fork cluster, with a live console.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="PATH", help="config file (default: ./clusterctl.toml or pyproject.toml)")
        p.add_argument("--db", metavar="PATH", help="the store (default: .clusterctl/state.db)")
        return p

    def control(name: str, help_text: str) -> argparse.ArgumentParser:
        p = with_config(sub.add_parser(name, help=help_text, description=help_text))
        p.add_argument("--socket", metavar="PATH", help="control socket, when several primaries share the store")
        return p

    up = with_config(sub.add_parser("up", help="start the primary (the default command)"))
    up.add_argument("--headless", action="store_true", help="no console; event lines on stderr (for systemd)")
    up.add_argument("--app", metavar="MODULE:ATTR", help="the ASGI or WSGI app to serve")
    up.add_argument("--bind", metavar="ADDR", help="HOST:PORT or unix:/path")
    up.add_argument("--workers", metavar="N", help='number of workers, or "auto" (usable CPUs)')

    commands = {}
    for command in COMMANDS.values():
        if command.cli:
            commands[command.name] = p = control(command.name, command.help)
            if command.name != "scale":  # one argument, N|+K|-K, for two on the wire
                for arg in command.args:
                    p.add_argument(
                        arg.name, type=int if arg.check is whole else str, metavar=arg.name.upper(), help=arg.help
                    )
    commands["status"].add_argument("--json", action="store_true", help="print the status object as JSON")
    commands["scale"].add_argument("count", metavar="N|+K|-K")
    commands["run-job"].add_argument(
        "--wait", action="store_true", help="wait for the run; exit 0 only if it succeeded"
    )
    history = with_config(sub.add_parser("history", help="job runs, read from the store (no primary needed)"))
    history.add_argument("--job", metavar="NAME", help="only this job")
    history.add_argument("--status", help="only runs with this status")
    history.add_argument("--limit", type=int, default=50, metavar="N")
    history.add_argument("--json", action="store_true", help="print JSON")
    hooks = with_config(sub.add_parser("webhooks", help="recent webhook deliveries, read from the store"))
    hooks.add_argument("--json", action="store_true", help="print JSON")
    hooks.add_argument("--limit", type=int, default=50, metavar="N")
    hooks.add_argument("--endpoint", metavar="NAME", help="only this endpoint")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", metavar="replay")
    replay = hooks_sub.add_parser("replay", help="deliver again: one delivery, or a range")
    # The same options as `webhooks`, accepted on either side of `replay`; SUPPRESS keeps a value
    # given before `replay` from being reset by this parser's default.
    replay.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="config file")
    replay.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS, help="the store")
    replay.add_argument("delivery", nargs="?", type=int, metavar="ID", help="a delivery id (see `webhooks`)")
    replay.add_argument(
        "--endpoint", metavar="NAME", default=argparse.SUPPRESS, help="every delivery of this endpoint in the range"
    )
    replay.add_argument("--since", metavar="ISO", help="events created at or after this time (UTC)")
    replay.add_argument("--until", metavar="ISO", help="events created at or before this time (UTC)")
    replay.add_argument(
        "--status", action="append", choices=("dead", "failed", "delivered"), help="which deliveries (default: all)"
    )
    with_config(sub.add_parser("check", help="validate the config, import the app in a child process, and exit"))
    control("attach", "the console, on the primary running for this store (q leaves it running)")
    logs = with_config(sub.add_parser("logs", help="the workers' output lines, read from logs/workers.log"))
    logs.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="print the last N lines (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing lines as they come, until Ctrl+C")
    logs.add_argument("--worker", type=int, metavar="ID", help="only this worker slot")
    unit = with_config(sub.add_parser("systemd-unit", help="print a systemd unit that runs this config headless"))
    unit.add_argument("--socket", action="store_true", help="also print the matching .socket unit (socket activation)")
    unit.add_argument("--app", metavar="MODULE:ATTR", help="as for `up`: passed on in ExecStart=")
    unit.add_argument("--bind", metavar="ADDR", help="as for `up`: passed on in ExecStart=")
    unit.add_argument("--workers", metavar="N", help="as for `up`: passed on in ExecStart=")
    return parser


def main(argv: list[str] | None = None, entry: Entry = Entry()) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and not args_list[0].startswith("-") and args_list[0] not in CLI_COMMANDS:
        # Only flags may stand for `up`: a mistyped command must not start a cluster or read as up's argument.
        _fail(_unknown_command(args_list[0]))
    bare = not args_list or (args_list[0] not in CLI_COMMANDS and args_list[0] not in ("-h", "--help", "--version"))
    if bare:
        args_list.insert(0, "up")
    args = _parser().parse_args(args_list)
    try:
        code = _dispatch(args, entry, bare)
        sys.stdout.flush()  # a reader that went away (`| head -1`) shows up here, not at interpreter exit
    except BrokenPipeError:
        # Quietly, like other tools in a pipeline; stdout goes to devnull so the exit flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except ConfigError as exc:
        _fail(str(exc))
    except NoPrimary as exc:
        _fail(str(exc), EXIT_NOT_RUNNING)
    except Interrupted as exc:
        _fail(str(exc), EXIT_FAILED)
    except ControlError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"clusterctl-tui: error: {message}", file=sys.stderr)
    sys.exit(code)


def version() -> str:
    """The installed distribution's version; a source tree that was never installed reads pyproject.toml."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("clusterctl-tui")
    except PackageNotFoundError:
        import tomllib

        try:
            with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as fh:
                return str(tomllib.load(fh)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class _VersionAction(argparse.Action):
    """argparse's `version` action, but the version is looked up only when asked for (not on every command)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"clusterctl-tui {version()}")
        parser.exit()


def _unknown_command(word: str) -> str:
    close = difflib.get_close_matches(word, sorted(CLI_COMMANDS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(sorted(CLI_COMMANDS))}"
    return f"unknown command {word!r} ({hint})"


def _settings(args: argparse.Namespace, **flags: Any) -> Settings:
    overrides = {key: value for key, value in flags.items() if value is not None}
    if getattr(args, "db", None):
        overrides["db"] = args.db
    return load_settings(args.config, overrides)


def _dispatch(args: argparse.Namespace, entry: Entry, bare: bool) -> int:
    if args.command == "attach":
        if entry.attach is None:
            raise ConfigError("attach needs the console: run it as `clusterctl-tui attach`")
        return entry.attach(_settings(args).store.path, Path(args.socket) if args.socket else None)
    if args.command == "up":
        if args.workers is not None:
            parse_workers(args.workers, "--workers")
        settings = _settings(args, app=args.app, bind=args.bind, workers=args.workers)
        if args.app is None:
            from .demo import with_demo_extras

            settings = with_demo_extras(settings)
        return _up(settings, args.headless, entry, bare)
    if args.command == "check":
        settings = _settings(args)
        _resolve_secrets(settings)
        interface = _import_app(settings)
        source = settings.source or "no config file (the bundled demo)"
        print(
            f"config OK ({source}): app {settings.app.target} ({interface}), bind {settings.server.bind}, "
            f"{settings.server.workers} workers, {len(settings.jobs)} jobs, {len(settings.webhooks)} webhooks"
        )
        return 0
    if args.command == "systemd-unit":
        return _systemd_unit(args)
    settings = _settings(args)
    if args.command == "logs":
        from .logfiles import run_logs

        return run_logs(settings.store.path, args.lines, args.follow, args.worker)
    if args.command == "history":
        return _history(settings, args)
    if args.command == "webhooks":
        return _webhooks(settings, args)
    scale = _scale_args(args.count) if args.command == "scale" else None  # bad input: 2 even with no primary
    path = resolve_socket(settings.store.path, args.socket)
    if args.command == "status":
        status = request(path, "status")
        print(json.dumps(status, indent=2) if args.json else _format_status(status))
        return 0
    if args.command == "scale":
        print(COMMANDS["scale"].report(request(path, "scale", scale)))
        return 0
    if args.command == "reload":
        try:
            result = request(path, "reload", timeout=None)
        except NoPrimary:
            raise
        except Interrupted as exc:
            print(f"clusterctl-tui: reload interrupted: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except ControlError as exc:
            print(f"clusterctl-tui: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(COMMANDS["reload"].report(result))
        return 0
    command = COMMANDS[args.command]
    result = request(path, command.name, {arg.name: getattr(args, arg.name) for arg in command.args})
    if args.command == "stop":
        return _wait_gone(int(result["pid"]), settings.server.graceful_timeout + 15)
    print(command.report(result))
    if args.command == "run-job" and args.wait:
        run_id = result["run_id"]
        request(path, "wait-run", {"job": args.job, "run_id": run_id}, timeout=None)
        run = _read_runs(settings, run_id=run_id)[0]
        print(
            f"run {run_id}: {run['status']}" + ("" if run["exit_code"] is None else f" (exit code {run['exit_code']})")
        )
        return 0 if run["status"] == "succeeded" else 1
    return 0


def _systemd_unit(args: argparse.Namespace) -> int:
    from .systemd import render_units

    if args.workers is not None:
        parse_workers(args.workers, "--workers")
    settings = _settings(args, app=args.app, bind=args.bind, workers=args.workers)
    flags = [
        arg for flag in ("app", "bind", "workers") if getattr(args, flag) for arg in (f"--{flag}", getattr(args, flag))
    ]
    print(render_units(settings, flags, args.socket), end="")
    return 0


def _resolve_secrets(settings: Settings) -> None:
    """Every webhook secret, resolved as `up` resolves it; the message names the reference, never the value."""
    from .demo import with_demo_extras
    from .outbox import SecretError, resolve_secret

    for hook in with_demo_extras(settings).webhooks:
        try:
            resolve_secret(hook.secret, hook.name)
        except SecretError as exc:
            raise ConfigError(str(exc)) from None


# `check` runs this in a fresh interpreter (cwd on sys.path, as for `python -m runtime.worker`), so the
# import is the one a worker does. Anything the app prints goes to stderr, leaving the last line of stdout
# for the verdict; os._exit so that threads the app started at import time cannot keep it running.
_IMPORT_PROBE = """
import json, os, sys
verdict_out, sys.stdout = sys.stdout, sys.stderr
from runtime.worker import AppLoadError, load_app
try:
    verdict = {"interface": load_app(sys.argv[1], sys.argv[2])[1]}
except AppLoadError as exc:
    verdict = {"error": str(exc)}
verdict_out.write("\\n" + json.dumps(verdict) + "\\n")
verdict_out.flush()
os._exit(0)
"""


def _import_app(settings: Settings) -> str:
    """Import the app as a worker would, in a child process; the interface it was detected as."""
    target = settings.app.target
    env = {
        # A worker's environment (see Supervisor's spawn), without the channel to a primary: there is none.
        **dict(settings.server.env_file_values),
        **os.environ,
        "CLUSTERCTL_INSTANCE_TYPE": "worker",
        "CLUSTERCTL_WORKER_ID": "1",
        "CLUSTERCTL_PRIMARY_PID": str(os.getpid()),
        "CLUSTERCTL_DB": settings.store.db,
        "CLUSTERCTL_GENERATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    timeout = settings.server.ready_timeout  # what a starting worker gets, import included
    try:
        result = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, target, settings.app.interface],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"app {target!r} was still importing after {timeout:g}s (server.ready_timeout)") from None
    try:
        verdict = json.loads(result.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        last = result.stderr.strip().splitlines()[-1:]  # a crash's own last words, if it had any
        raise ConfigError(
            f"cannot import app {target!r}: the importing process ended with status {result.returncode}"
            + "".join(f": {line}" for line in last)
        ) from None
    if "error" in verdict:
        raise ConfigError(verdict["error"])
    return str(verdict["interface"])


def _scale_args(text: str) -> dict[str, int]:
    """`N` → a count, `+K`/`-K` → a delta; refused here when no cluster could take it."""
    match = re.fullmatch(r"([+-]?)([0-9]+)", text.strip())
    if match is None:
        _fail(f"scale: expected N, +K or -K (whole numbers), got {text!r}")
    sign, digits = match.groups()
    digits = digits.lstrip("0") or "0"
    # More digits than any count has is out of range; int() would refuse thousands of them.
    number = int(digits) if len(digits) <= len(str(MAX_WORKERS)) else MAX_WORKERS + 1
    if sign:
        if number >= MAX_WORKERS:
            _fail(f"scale: {text.strip()} would leave the range 1..{MAX_WORKERS} workers")
        return {"delta": -number if sign == "-" else number}
    if not 1 <= number <= MAX_WORKERS:
        _fail(f"scale: expected a worker count from 1 to {MAX_WORKERS}, got {digits}")
    return {"count": number}


def _check_store_path(path: Path) -> None:
    """Refuse, naming the path, what cannot be a store, before SQLite says something vaguer (or creates one)."""
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # is_dir() is False for a missing path, and raises for one we may not look at
        raise ConfigError(f"cannot read store {path}: {exc.strerror or exc}") from None
    if is_dir:
        raise ConfigError(f"store {path} is a directory, not a SQLite database")
    if not path.exists():
        raise ConfigError(f"no store at {path} (has a primary ever run here?)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"cannot read store {path}: permission denied")


def _read_runs(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    if settings.store.url:
        return _read_shared_runs(settings, **filters)
    from .store import connect

    _check_store_path(settings.store.path)
    try:
        conn = connect(settings.store.path)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read store {settings.store.path}: {exc}") from None
    conn.row_factory = sqlite3.Row
    try:
        if "run_id" in filters:
            rows = conn.execute("SELECT * FROM job_runs WHERE id = ?", (filters["run_id"],))
        else:
            clauses = [f"{key} = ?" for key in ("job", "status") if filters.get(key)]
            values = [filters[key] for key in ("job", "status") if filters.get(key)]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = conn.execute(f"SELECT * FROM job_runs {where} ORDER BY id DESC LIMIT ?", (*values, filters["limit"]))
        return [dict(row) for row in rows]
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read store {settings.store.path}: {exc}") from None
    finally:
        conn.close()


def _read_shared_runs(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    """`_read_runs` on a server database, through the store's own reads."""
    from .store import StoreError

    store = _open_store(settings)
    try:
        if "run_id" in filters:
            run = store.job_run(filters["run_id"])
            return [run] if run else []
        return store.job_history(filters.get("job"), filters.get("status"), filters["limit"])
    except StoreError as exc:
        raise ConfigError(f"cannot read store {settings.store.label}: {exc}") from None
    finally:
        store.close()


def _open_store(settings: Settings) -> Any:
    from .store import Store, StoreError, open_store

    try:
        if settings.store.url:  # read where the primaries keep it, never created from here
            return open_store(settings.store, prepare=False)
        _check_store_path(settings.store.path)
        return Store(settings.store.path)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None


def _webhooks(settings: Settings, args: argparse.Namespace) -> int:
    from .store import StoreError

    store = _open_store(settings)
    try:
        if args.webhooks_command == "replay":
            if args.delivery is None and not (args.endpoint or args.since or args.until):
                _fail("webhooks replay: give a delivery ID, or --endpoint/--since/--until for a range")
            ids = store.replay(
                delivery_id=args.delivery,
                endpoint=args.endpoint,
                since=args.since,
                until=args.until,
                statuses=tuple(args.status or ("dead", "failed", "delivered")),
            )
            if not ids:
                _fail("webhooks replay: no delivery matches" + (f" id {args.delivery}" if args.delivery else ""))
            print(f"queued {len(ids)} deliveries again (same webhook-id, new signature): {', '.join(map(str, ids))}")
            return 0
        deliveries = store.deliveries(limit=args.limit, endpoint=args.endpoint)
    except (sqlite3.Error, StoreError) as exc:  # a SQLite file of some other program's; an unreachable server
        raise ConfigError(f"cannot read store {settings.store.label}: {exc}") from None
    finally:
        store.close()
    if args.json:
        print(json.dumps(deliveries, indent=2))
        return 0
    print(f"{'ID':>6} {'ENDPOINT':<14} {'TYPE':<24} {'STATUS':<10} {'TRIES':>5} {'CODE':>4}  LAST ERROR")
    for d in deliveries:
        code = d["response_code"] or "-"
        error = (d["last_error"] or "")[:60]
        print(
            f"{d['id']:>6} {d['endpoint'][:14]:<14} {d['type'][:24]:<24} {d['status']:<10} {d['attempt']:>5} "
            f"{code:>4}  {error}"
        )
    return 0


def _history(settings: Settings, args: argparse.Namespace) -> int:
    runs = _read_runs(settings, job=args.job, status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'ID':>6} {'JOB':<16} {'SCHEDULED FOR (UTC)':<24} {'TRIGGER':<9} {'STATUS':<10} {'EXIT':>5} {'TRY':>3}")
    for run in runs:
        code = "-" if run["exit_code"] is None else run["exit_code"]
        print(
            f"{run['id']:>6} {run['job'][:16]:<16} {run['scheduled_for'][:24]:<24} {run['trigger']:<9} "
            f"{run['status']:<10} {code:>5} {run['attempt']:>3}"
        )
    return 0


def _up(settings: Settings, headless: bool, entry: Entry, bare: bool) -> int:
    # Until the primary installs its handlers, a HUP (`systemctl reload` during a deploy) must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not headless:
        if entry.console is not None and sys.stdin.isatty() and sys.stdout.isatty():
            return entry.console(settings, bare)
        print("clusterctl-tui: no terminal (or no console); running headless: `up --headless` says so", file=sys.stderr)
    from .headless import run_headless

    return asyncio.run(run_headless(settings))


def _wait_gone(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        if gone:
            print(f"stopped (primary {pid})")
            return 0
        time.sleep(0.05)
    print(f"clusterctl-tui: primary {pid} still running after {timeout:g}s", file=sys.stderr)
    return 1


def _format_status(status: dict[str, Any]) -> str:
    primary = status["primary"]
    workers = status["workers"]
    ready = sum(1 for w in workers if w["state"] == "ready")
    totals = status.get("totals", {})
    lines = [
        f"primary {primary['pid']} on {primary['bind']}: {ready}/{status['desired_workers']} workers ready, "
        f"generation {status.get('generation', 1)}, {totals.get('requests_per_second', 0):.1f} req/s, "
        f"p99 {totals.get('p99_ms', 0):.1f} ms",
        f"{'ID':>3} {'PID':>8} {'STATE':<9} {'GEN':>3} {'CPU%':>6} {'RSS':>8} {'REQ/S':>8} "
        f"{'P99MS':>7} {'REQUESTS':>9} {'RESTARTS':>8}",
    ]
    for w in workers:
        rss = f"{w['rss_bytes'] / 1048576:.0f}M" if w["rss_bytes"] else "-"
        lines.append(
            f"{w['id']:>3} {w['pid'] or '-':>8} {w['state']:<9} {w['generation']:>3} {w['cpu_percent']:>6.1f} "
            f"{rss:>8} {w['requests_per_second']:>8.1f} {w['p99_ms']:>7.1f} {w['requests_total']:>9} "
            f"{w['restarts']:>8}"
        )
    hooks = status.get("webhooks", {})
    lines.append(
        f"webhooks: {hooks.get('pending', 0)} pending, {hooks.get('failed', 0)} failed, "
        f"{hooks.get('delivered', 0)} delivered"
    )
    primaries = status.get("primaries", [])
    if len(primaries) > 1:
        lines.append(f"{len(primaries)} primaries share the store:")
        for p in primaries:
            lines.append(f"  {p['host']} pid {p['pid']} on {p['bind']}: {p['workers_ready']} workers ready")
    if status.get("store_error"):
        lines.append(f"store: {status['store_error']}")
    return "\n".join(lines)
