"""`clusterctl-tui` on a real terminal (tmux): the console, `d` to detach, `attach`, and a terminal that dies.

Each test runs its own tmux server (`-L`), types into it with send-keys and reads the screen with
capture-pane, polling with deadlines. Primaries are stopped through their control socket, or by PID.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import free_port, get, pid_alive, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")


@dataclass
class Terminal:
    server: str
    cwd: Path

    def tmux(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.server, *args], capture_output=True, text=True, timeout=10)
        return result.stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "main", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "main", "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", "main", key)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main")

    def shows(self, text: str, timeout: float = 20) -> str:
        return wait_for(lambda: text in self.screen() and self.screen(), timeout, f"{text!r} on the terminal")


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    server = f"clusterctl-test-{os.getpid()}-{tmp_path.name}"
    term = Terminal(server, tmp_path)
    env = {**os.environ, "PS1": "$ ", "TERM": "xterm-256color"}
    subprocess.run(
        ["tmux", "-L", server, "new-session", "-d", "-s", "main", "-x", "100", "-y", "30", "bash --norc --noprofile"],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=10,
    )
    try:
        yield term
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, timeout=10)

        # Whatever ran on that terminal ends with it (a console that outlived it spun on a dead tty).
        def ours() -> list[psutil.Process]:
            found = []
            for proc in psutil.process_iter(["cmdline"]):
                if str(tmp_path) in " ".join(proc.info["cmdline"] or ()):
                    found.append(proc)
            return found

        try:
            wait_for(lambda: not ours(), 10, "every process of the terminal gone with it")
        finally:
            for proc in ours():
                proc.kill()


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clusterctl_tui", *args, "--db", str(cwd / "state.db")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def status(cwd: Path) -> dict:
    result = cli(cwd, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def stop_after(tmp_path: Path) -> Iterator[None]:
    yield
    result = cli(tmp_path, "status", "--json")
    if result.returncode == 0:
        pid = json.loads(result.stdout)["primary"]["pid"]
        if cli(tmp_path, "stop").returncode != 0 and pid_alive(pid):
            os.kill(pid, 9)


def start(term: Terminal, port: int) -> None:
    command = [sys.executable, "-m", "clusterctl_tui", "--bind", f"127.0.0.1:{port}", "--workers", "2"]
    term.type(shlex.join([*command, "--db", str(term.cwd / "state.db")]))
    term.shows("2/2 ready", timeout=30)


def test_detach_leaves_the_cluster_serving_and_attach_brings_the_console_back(terminal, stop_after, tmp_path):
    port = free_port()
    start(terminal, port)
    primary = status(tmp_path)["primary"]["pid"]

    terminal.key("d")
    terminal.shows("detached; the primary")
    assert get(port)[0] == 200
    assert status(tmp_path)["primary"]["pid"] == primary

    terminal.type(
        "clear; " + shlex.join([sys.executable, "-m", "clusterctl_tui", "attach", "--db", str(tmp_path / "state.db")])
    )
    terminal.shows("attached")
    terminal.key("+")
    wait_for(lambda: sum(w["state"] == "ready" for w in status(tmp_path)["workers"]) == 3, 20, "3 workers")
    terminal.key("q")
    wait_for(lambda: "attached" not in terminal.screen(), 10, "the attached console to close")
    assert status(tmp_path)["primary"]["pid"] == primary
    assert get(port)[0] == 200


def test_a_bare_command_attaches_to_the_running_primary(terminal, stop_after, tmp_path):
    port = free_port()
    start(terminal, port)
    terminal.key("d")
    terminal.shows("detached; the primary")
    terminal.type("clear; " + shlex.join([sys.executable, "-m", "clusterctl_tui", "--db", str(tmp_path / "state.db")]))
    terminal.shows("attached")
    assert len(status(tmp_path)["workers"]) == 2  # attached: no second primary started


def test_a_terminal_that_dies_never_takes_the_site_down(terminal, stop_after, tmp_path):
    port = free_port()
    start(terminal, port)
    primary = status(tmp_path)["primary"]["pid"]
    terminal.tmux("kill-server")  # the SSH session dropped
    wait_for(lambda: get(port)[0] == 200, 10, "the site, after the terminal died")
    assert status(tmp_path)["primary"]["pid"] == primary
    assert pid_alive(primary)
    log = tmp_path / "logs" / "primary.log"
    assert log.exists()  # its output goes to the log from now on
