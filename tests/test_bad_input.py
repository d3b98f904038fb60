"""Bad input end to end: one line on stderr, exit status 2, no traceback, and nothing left running."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ERROR_PREFIX = "clusterctl-tui: error:"
MIGRATION = "import sys; print('migration exploded'); sys.exit(4)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=cwd,
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
    )


def up(tmp_path: Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    # argparse keeps the last value of a repeated option, so a case's own
    # --workers/--bind/--db replaces these safe defaults.
    base = ["up", "--headless", "--workers", "1", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "state.db")]
    return cli(tmp_path, *base, *extra)


WORKER_LINE = re.compile(r"w\d+\[\d+\] ")


def error_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """Exit `status` (2: bad input), no traceback anywhere, and exactly one error line, which is returned."""
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    # The app's own traceback, echoed from a worker (`w1[pid] ...`) for journald, is the operator's to see.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if not WORKER_LINE.match(line)]
    assert not [line for line in ours if "Traceback" in line], output
    assert result.returncode == status, output
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, output
    return lines[0]


def assert_nothing_left(tmp_path: Path, port: int, stderr: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: fails if anything still holds the port
    assert psutil.Process().children(recursive=True) == []
    for pid in {int(p) for p in re.findall(r"\(pid (\d+)\)", stderr)}:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            continue
        assert status == psutil.STATUS_ZOMBIE, f"worker pid {pid} outlived its primary ({status})"
    assert list(tmp_path.glob("state.db.*.sock")) == [], "control socket left behind"


# ---------------------------------------------------------------- check and status


def test_check_refuses_unknown_key(tmp_path: Path) -> None:
    (tmp_path / "clusterctl.toml").write_text("[server]\nworkerz = 2\n")
    line = error_line(cli(tmp_path, "check"))
    assert "clusterctl.toml" in line
    assert "workerz" in line


def test_check_accepts_valid_config(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text("async def app(scope, receive, send):\n    pass\n")  # check imports it
    (tmp_path / "clusterctl.toml").write_text(
        '[app]\ntarget = "myapp:app"\n[server]\nworkers = 2\n'
        '[[jobs]]\nname = "cleanup"\nschedule = "*/5 * * * *"\ncommand = ["true"]\n'
    )
    result = cli(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "clusterctl.toml" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_refuses_config_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "clusterctl.toml").write_bytes(b"# caf\xe9\n[server]\nworkers = 1\n")
    assert "clusterctl.toml" in error_line(cli(tmp_path, "check"))


def test_status_without_a_primary(tmp_path: Path) -> None:
    # 3, as LSB init scripts say "not running": a script can tell "down" from "broken" (2).
    line = error_line(cli(tmp_path, "status", "--db", str(tmp_path / "state.db")), status=3)
    assert "no running primary" in line


# ---------------------------------------------------------------- up: every case fails at start-up

APP_FILES = {
    "broken_app.py": 'raise RuntimeError("boom at import")\n',
    "exit_app.py": "import sys\n\nsys.exit(3)\n",
    "broken_ok.py": "x = 1\n",
    "afile": "a regular file, not a directory\n",
}

# (extra up arguments, files for tmp_path, alternatives: each tuple needs one of its strings in the error line)
UP_CASES = {
    "unknown-config-key": ([], {"clusterctl.toml": "[server]\nworkerz = 2\n"}, [("clusterctl.toml",), ("workerz",)]),
    "workers-zero": (["--workers", "0"], {}, [("--workers",), ("0",)]),
    "workers-abc": (["--workers", "abc"], {}, [("--workers",), ("abc",)]),
    "bind-nonsense": (["--bind", "nonsense"], {}, [("bind",), ("nonsense",)]),
    "app-module-missing": (["--app", "nosuchmodule:app"], {}, [("nosuchmodule",)]),
    "app-raises-at-import": (
        ["--app", "broken_app:app"],
        APP_FILES,
        [("broken_app",), ("boom at import", "RuntimeError")],
    ),
    "app-exits-at-import": (["--app", "exit_app:app"], APP_FILES, [("exit_app",), ("SystemExit", "exit code 3")]),
    "app-attribute-missing": (["--app", "broken_ok:missing"], APP_FILES, [("broken_ok",), ("missing",)]),
    "before-start-fails": (
        [],
        {"clusterctl.toml": f"[app]\nbefore_start = {json.dumps([sys.executable, '-c', MIGRATION])}\n"},
        [("before_start",), ("exit code 4",), ("migration exploded",)],
    ),
    "store-parent-is-a-file": (["--db", "{tmp}/afile/state.db"], APP_FILES, [("store",), ("afile/state.db",)]),
}


@pytest.mark.parametrize(("extra", "files", "needles"), list(UP_CASES.values()), ids=list(UP_CASES))
def test_up_refuses(tmp_path: Path, extra: list[str], files: dict[str, str], needles: list[tuple[str, ...]]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    port = free_port()
    result = up(tmp_path, port, *(arg.format(tmp=tmp_path) for arg in extra))
    line = error_line(result)
    for alternatives in needles:
        assert any(needle in line for needle in alternatives), f"none of {alternatives} in {line!r}"
    assert_nothing_left(tmp_path, port, result.stderr)


def test_up_refuses_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = up(tmp_path, port)
        line = error_line(result)
        assert f"127.0.0.1:{port}" in line
        assert "in use" in line
    assert_nothing_left(tmp_path, port, result.stderr)
