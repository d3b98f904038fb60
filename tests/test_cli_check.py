"""The command line's front door (issue 11): `--version`, mistyped commands, config typos, what `check`
proves before anything starts (the app imports, every schedule can fire), and how light `emit()` is."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from runtime.config import JobConfig
from runtime.cron import CronSchedule, ever_fires, is_valid
from runtime.events import Event, EventBus
from runtime.outbox import EmitError, emit
from runtime.scheduler import Scheduler
from runtime.store import AsyncStore, Store

ERROR_PREFIX = "clusterctl-tui: error:"
FEB_30 = "0 3 30 2 *"


def cli(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, no traceback, and exactly one line on stderr, the error, which is returned."""
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), output
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- --version and commands


def test_version_prints_the_installed_version_and_exits_0(tmp_path: Path) -> None:
    result = cli(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"clusterctl-tui {importlib.metadata.version('clusterctl-tui')}\n"
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("word", "hint"),
    [
        ("stauts", "(did you mean 'status'?)"),
        ("relaod", "(did you mean 'reload'?)"),
        ("histroy", "(did you mean 'history'?)"),
        ("frobnicate", "(commands: "),
    ],
)
def test_a_mistyped_command_is_named_with_the_one_meant(tmp_path: Path, word: str, hint: str) -> None:
    line = error_line(cli(tmp_path, word, "--json"))
    assert f"unknown command {word!r} {hint}" in line, line
    assert "unrecognized arguments" not in line


def test_flags_without_a_command_are_still_flags_of_up(tmp_path: Path) -> None:
    # Refused by `up`'s own validation, so they were parsed as `up` flags, and nothing started.
    line = error_line(cli(tmp_path, "--workers", "0", "--db", str(tmp_path / "state.db")))
    assert "--workers" in line and "unknown command" not in line, line
    line = error_line(cli(tmp_path, "--bind", "nowhere", "--db", str(tmp_path / "state.db")))
    assert "--bind" in line and "unknown command" not in line, line


# ---------------------------------------------------------------------------- config typos


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[server]\nworker = 4\n", "[server]: unknown key 'worker' (did you mean 'workers'?)"),
        ('[app]\ntraget = "a:b"\n', "[app]: unknown key 'traget' (did you mean 'target'?)"),
        ('[[job]]\nname = "x"\n', "unknown key 'job' (did you mean 'jobs'?)"),
        ("[server]\nzzz = 1\n", "[server]: unknown key 'zzz' (known keys: "),  # nothing close: all of them
    ],
)
def test_an_unknown_key_is_refused_with_the_close_one(tmp_path: Path, toml: str, expected: str) -> None:
    (tmp_path / "clusterctl.toml").write_text(toml)
    line = error_line(cli(tmp_path, "check"))
    assert "clusterctl.toml" in line and expected in line, line
    assert ("known keys" in line) == ("did you mean" not in line), line


# ---------------------------------------------------------------------------- check imports the app

# The app records, at import time, what a worker would see, prints (which must not spoil the verdict)
# and leaves a non-daemon thread running (which must not keep `check` waiting).
GOOD_APP = """
import os, threading, time
from pathlib import Path

Path("imported.txt").write_text(" ".join(
    f"{key}={os.environ.get(key)}" for key in ("CLUSTERCTL_INSTANCE_TYPE", "CLUSTERCTL_WORKER_ID", "CLUSTERCTL_DB")
) + f" pid={os.getpid()}")
print("hello from the app's import")
threading.Thread(target=time.sleep, args=(120,)).start()

def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]

async def asgi(scope, receive, send):
    pass
"""


def app_config(tmp_path: Path, target: str, extra: str = "") -> None:
    (tmp_path / "clusterctl.toml").write_text(f'[app]\ntarget = "{target}"\n' + extra)


def test_check_imports_the_app_in_a_child_process_with_a_worker_environment(tmp_path: Path) -> None:
    (tmp_path / "goodapp.py").write_text(GOOD_APP)
    app_config(tmp_path, "goodapp:app")
    started = time.monotonic()
    result = cli(tmp_path, "check")
    assert time.monotonic() - started < 30, "check waited for a thread the app started"
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "app goodapp:app (wsgi)" in result.stdout, result.stdout
    seen = (tmp_path / "imported.txt").read_text()
    assert "CLUSTERCTL_INSTANCE_TYPE=worker" in seen and "CLUSTERCTL_WORKER_ID=1" in seen, seen
    assert f"CLUSTERCTL_DB={tmp_path / '.clusterctl' / 'state.db'}" in seen, seen
    assert not (tmp_path / ".clusterctl" / "state.db").exists(), "check created a store"

    app_config(tmp_path, "goodapp:asgi")
    result = cli(tmp_path, "check")
    assert result.returncode == 0 and "app goodapp:asgi (asgi3)" in result.stdout, result.stdout + result.stderr


def test_check_imports_the_app_with_the_env_file_a_worker_gets(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("APP_DATABASE_URL=sqlite:///app.db\n")
    (tmp_path / "needsenv.py").write_text("import os\nDB = os.environ['APP_DATABASE_URL']\napp = lambda e, s: []\n")
    app_config(tmp_path, "needsenv:app", '[server]\nenv_file = ".env"\n')
    result = cli(tmp_path, "check")
    assert result.returncode == 0 and "app needsenv:app (wsgi)" in result.stdout, result.stdout + result.stderr
    (tmp_path / ".env").write_text("OTHER=1\n")
    assert "KeyError: 'APP_DATABASE_URL'" in error_line(cli(tmp_path, "check"))


@pytest.mark.parametrize(
    ("files", "target", "expected"),
    [
        ({}, "myapp:app", "cannot import app 'myapp:app': ModuleNotFoundError: No module named 'myapp'"),
        (
            {"broken.py": "import os\nraise RuntimeError('no DATABASE_URL')\n"},
            "broken:app",
            "cannot import app 'broken:app': RuntimeError: no DATABASE_URL",
        ),
        ({"quitter.py": "raise SystemExit(3)\n"}, "quitter:app", "cannot import app 'quitter:app': SystemExit: 3"),
        ({"noattr.py": "x = 1\n"}, "noattr:app", "module 'noattr' has no 'app'"),
        ({"crasher.py": "import os\nos._exit(7)\n"}, "crasher:app", "ended with status 7"),
    ],
    ids=["missing-module", "raises", "sys-exit", "no-attribute", "process-dies"],
)
def test_check_refuses_an_app_that_does_not_import_in_one_line(
    tmp_path: Path, files: dict[str, str], target: str, expected: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    app_config(tmp_path, target)
    line = error_line(cli(tmp_path, "check"))
    assert expected in line, line


# ---------------------------------------------------------------------------- schedules


def test_a_schedule_that_never_fires_is_refused_by_check_and_by_up(tmp_path: Path) -> None:
    app_config(tmp_path, "runtime.demo:app", f'[[jobs]]\nname = "leap"\nschedule = "{FEB_30}"\ncommand = ["true"]\n')
    line = error_line(cli(tmp_path, "check"))
    assert f"[[jobs]] 'leap' schedule: '{FEB_30}' never fires" in line, line
    port = free_port()
    result = cli(tmp_path, "up", "--headless", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "state.db"))
    assert error_line(result) == line
    assert "CroniterBadDateError" not in result.stderr
    assert psutil.Process().children(recursive=True) == []


@pytest.mark.parametrize("nickname", ["@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"])
def test_cron_nicknames_are_accepted(tmp_path: Path, nickname: str) -> None:
    app_config(tmp_path, "runtime.demo:app", f'[[jobs]]\nname = "n"\nschedule = "{nickname}"\ncommand = ["true"]\n')
    result = cli(tmp_path, "check")
    assert result.returncode == 0 and "1 jobs" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("nickname", "fields"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@weekly", "0 0 * * 0"), ("@yearly", "0 0 1 1 *")],
)
def test_a_nickname_names_the_slots_of_its_five_fields(nickname: str, fields: str) -> None:
    start = datetime(2026, 3, 7, 13, 17, tzinfo=UTC)
    ours, theirs = CronSchedule(nickname, "Europe/Berlin"), CronSchedule(fields, "Europe/Berlin")
    assert list(ours.between(start, datetime(2027, 3, 7, tzinfo=UTC), limit=50)) == list(
        theirs.between(start, datetime(2027, 3, 7, tzinfo=UTC), limit=50)
    )
    assert ours.fixed_time == theirs.fixed_time


def test_which_schedules_can_fire() -> None:
    assert not is_valid("@reboot") and not is_valid("@fortnightly")
    for never in (FEB_30, "0 0 31 4 *", "0 0 31 2,4,6,9,11 *", "0 0 0 30 2 *"):
        assert is_valid(never) and not ever_fires(never), never
    # February 29th, and a day of the month OR'ed with a weekday (Vixie cron), do fire.
    for rare in ("0 0 29 2 *", "0 0 30 2 1", "0 0 * 2 1#5", "@yearly"):
        assert ever_fires(rare), rare


def test_a_job_whose_next_slot_cannot_be_computed_stops_loudly(tmp_path: Path) -> None:
    """The loader refuses such a schedule; were one to get past it, its loop must not die without a word."""
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    job = JobConfig(name="leap", schedule=FEB_30, command=("true",))

    async def scenario() -> None:
        store = AsyncStore(Store(tmp_path / "state.db"))
        scheduler = Scheduler((job,), store, events, {}, os.getpid())
        await scheduler.start()
        try:
            deadline = time.monotonic() + 10
            while not [e for e in seen if e.kind == "job.stopped"]:
                assert time.monotonic() < deadline, [(e.kind, e.message) for e in seen]
                await asyncio.sleep(0.02)
            assert scheduler.snapshot()[0].next_run is None
        finally:
            await scheduler.stop()
            store.close()

    asyncio.run(scenario())
    stopped = [e.message for e in seen if e.kind == "job.stopped"]
    assert len(stopped) == 1 and "leap" in stopped[0] and FEB_30 in stopped[0], stopped


# ---------------------------------------------------------------------------- lighter workers

PROBE = """
import sys
{code}
heavy = sorted(m for m in ("sqlite_utils", "click", "pluggy", "tabulate", "textual") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def fresh_interpreter(code: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_outbox_leaves_sqlite_utils_and_textual_out(tmp_path: Path) -> None:
    assert fresh_interpreter("import runtime.outbox", tmp_path) == "none"
    assert fresh_interpreter("from runtime import emit", tmp_path) == "none"


def test_emit_on_a_prepared_store_never_imports_sqlite_utils(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = Store(db)  # the primary's part: create, migrate, publish the endpoints
    store.sync_endpoints([{"name": "a", "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 1}])
    store.close()
    code = f"from runtime import emit\nassert emit('app.light', {{}}, db={str(db)!r}).startswith('msg_')"
    assert fresh_interpreter(code, tmp_path) == "none"
    assert fresh_interpreter("import runtime.store", tmp_path) == "none"


def test_emit_never_creates_a_store(tmp_path: Path) -> None:
    """A store only an emitter created would have no endpoints: its events would never be delivered."""
    db = tmp_path / "nowhere" / "state.db"
    with pytest.raises(EmitError, match="NOT recorded"):
        emit("app.lost", {}, db=db)
    assert not db.parent.exists()
