"""The control socket and the control commands under abuse: every request gets one answer, and
every bad input ends with one line on stderr and the documented exit status, never a traceback.

Protocol tests run a bare ControlServer on its own event loop thread with a dummy handler;
CLI tests run real primaries (the `start_cluster` fixture) or none at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, wait_for

from runtime import control
from runtime.control import ControlError, ControlServer, request

ERROR_PREFIX = "clusterctl-tui: error:"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# ---------------------------------------------------------------------------- helpers


class Server:
    """A ControlServer on an event loop in a thread, so the test can use blocking sockets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.entered = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = ControlServer(path, self.handle)
        self.run(self.server.start())

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(10)

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        self.calls.append((cmd, args))
        if cmd == "scale":
            return {"desired_workers": int(args["count"])}  # what the primary does with the count
        if cmd == "crash":
            raise RuntimeError("kaboom")
        if cmd == "unencodable":
            return {"at": object()}
        if cmd == "refuse":
            raise ControlError("no such thing")
        if cmd == "wait":
            self.entered.set()
            await asyncio.Event().wait()
        return "pong"

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "ctl.sock")
    yield running
    running.close()


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; the socket's timeout bounds the wait.

    A server that closes with some of our bytes unread resets the connection after its answer.
    """
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def exchange(path: Path, raw: bytes) -> dict[str, Any]:
    """Send raw bytes; the server must answer with exactly one JSON line and close."""
    with connect(path) as sock:
        sock.sendall(raw)
        data = read_all(sock)
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return json.loads(data)


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int, prefix: str = ERROR_PREFIX) -> str:
    """Exit `code`, no traceback, and exactly one line on stderr, which starts with `prefix`."""
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == code, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), output
    return lines[0]


# ---------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_non_finite_numbers_are_bad_requests(server: Server, value: str) -> None:
    reply = exchange(server.path, b'{"cmd": "scale", "args": {"count": %s}}\n' % value.encode())
    assert reply["ok"] is False and reply["error"].startswith("bad request:"), reply
    assert server.calls == [], "a non-finite number reached the handler"
    assert exchange(server.path, b'{"cmd": "scale", "args": {"count": 3}}\n')["result"] == {"desired_workers": 3}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json\n",
        b"\xff\xfe\n",
        b"[1, 2]\n",
        b'"status"\n',
        b'{"args": {}}\n',
        b'{"cmd": 5}\n',
        b'{"cmd": "status", "args": [["count", 1]]}\n',
        b'{"cmd": "scale", "args": {}}\n',
        b"\n",
        b"[" * 60_000 + b"\n",
    ],
    ids=["not-json", "not-utf8", "a-list", "a-string", "no-cmd", "cmd-not-a-string", "args-not-an-object",
         "missing-argument", "empty-line", "nested-too-deeply"],
)  # fmt: skip
def test_malformed_requests_get_one_bad_request_line(server: Server, raw: bytes) -> None:
    reply = exchange(server.path, raw)
    assert reply["ok"] is False and reply["error"].startswith("bad request:"), reply


def test_a_line_over_the_cap_is_refused_and_the_server_keeps_serving(server: Server) -> None:
    with connect(server.path) as sock:
        # The server answers and closes before reading all of it: the rest of our send may fail.
        try:
            sock.sendall(b'{"cmd": "status", "args": {"pad": "' + b"x" * 10_000_000 + b'"}}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_all(sock)
    reply = json.loads(data)
    assert reply == {"ok": False, "error": "bad request: request too long"}, reply
    assert server.calls == []
    assert exchange(server.path, b'{"cmd": "status"}\n') == {"ok": True, "result": "pong"}


def test_a_silent_client_is_dropped(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.3)
    started = time.monotonic()
    with connect(server.path, timeout=10) as sock:
        data = read_all(sock)
    assert time.monotonic() - started < 5, "dropped, but not by the read timeout"
    reply = json.loads(data)
    assert reply["ok"] is False and "no request within" in reply["error"], reply


def test_connections_over_the_cap_are_told_busy(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 60.0)  # the idle ones stay for the whole test
    idle = [connect(server.path) for _ in range(control.MAX_CONNECTIONS)]
    try:
        with connect(server.path, timeout=2) as extra:
            reply = json.loads(read_all(extra))  # closed at once, long before READ_TIMEOUT
        assert reply["ok"] is False and "busy" in reply["error"], reply
    finally:
        for sock in idle:
            sock.close()
    # The idle connections' slots come back once the server sees them close.
    wait_for(lambda: exchange(server.path, b'{"cmd": "status"}\n')["ok"], 10, "a served request after the burst")


def test_a_handler_crash_is_an_internal_error_and_the_server_keeps_serving(server: Server) -> None:
    reply = exchange(server.path, b'{"cmd": "crash"}\n')
    assert reply == {"ok": False, "error": "internal error: RuntimeError: kaboom"}, reply
    reply = exchange(server.path, b'{"cmd": "unencodable"}\n')
    assert reply["ok"] is False and reply["error"].startswith("internal error: TypeError:"), reply
    assert exchange(server.path, b'{"cmd": "refuse"}\n') == {"ok": False, "error": "no such thing"}
    assert exchange(server.path, b'{"cmd": "status"}\n') == {"ok": True, "result": "pong"}


def test_closing_the_server_answers_the_requests_in_flight(tmp_path: Path) -> None:
    running = Server(tmp_path / "ctl.sock")
    try:
        with connect(running.path) as sock:
            sock.sendall(b'{"cmd": "wait"}\n')
            assert running.entered.wait(10), "the handler never started"
            running.run(running.server.close())
            reply = json.loads(read_all(sock))
        assert reply == {"ok": False, "error": "the primary is stopping", "interrupted": True}, reply
        with pytest.raises(control.Interrupted, match="the primary is stopping"):
            reply_from(tmp_path, {"ok": False, "error": "the primary is stopping", "interrupted": True})
    finally:
        running.close()


def reply_from(tmp_path: Path, reply: Any, raw: bytes | None = None) -> Any:
    """What request() makes of one scripted answer from a fake server."""
    path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(raw if raw is not None else json.dumps(reply).encode() + b"\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            return request(path, "status", timeout=10)
        finally:
            thread.join(10)
            path.unlink()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"garbage\n", "ControlError"),
        (b"[1]\n", "ControlError"),
        (b"", "Interrupted"),
        (b'{"ok": tr', "Interrupted"),
    ],
    ids=["not-json", "not-an-object", "closed-without-a-reply", "closed-mid-reply"],
)
def test_request_turns_a_bad_reply_into_one_message(tmp_path: Path, raw: bytes, error: str) -> None:
    with pytest.raises(getattr(control, error)) as raised:
        reply_from(tmp_path, None, raw)
    assert "\n" not in str(raised.value) and str(raised.value)


# ---------------------------------------------------------------------------- out of file descriptors

FD_CHILD = """
import asyncio, os, resource, signal, sys
from pathlib import Path
from runtime.control import ControlServer

async def main(path):
    async def handler(cmd, args):
        return "pong"

    server = ControlServer(Path(path), handler)
    await server.start()
    freed = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, freed.set)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    filler = []
    try:
        while True:
            filler.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    await freed.wait()
    for fd in filler:
        os.close(fd)
    print("freed", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the child said nothing within {timeout}s"
    return proc.stdout.readline()


def test_running_out_of_fds_logs_one_line_and_serves_again(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    errors = tmp_path / "child.err"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", FD_CHILD, str(path)], stdout=subprocess.PIPE, stderr=stderr, env=env
        )
    try:
        assert read_line(proc, 15) == b"full\n", errors.read_text()
        with connect(path) as waiting:
            waiting.sendall(b'{"cmd": "status"}\n')
            # Every accept fails now; watch a few seconds of it: one line for the whole episode.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert errors.stat().st_size < 1000, errors.read_text()[:3000]
                time.sleep(0.1)
            output = errors.read_text()
            assert len(output.splitlines()) <= 1 and "Traceback" not in output, output
            os.kill(proc.pid, signal.SIGUSR1)
            assert read_line(proc, 10) == b"freed\n"
            assert json.loads(read_all(waiting)) == {"ok": True, "result": "pong"}, "the waiting client was lost"
        assert exchange(path, b'{"cmd": "status"}\n') == {"ok": True, "result": "pong"}
        assert len(errors.read_text().splitlines()) <= 1, errors.read_text()
    finally:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize("command", [["status"], ["scale", "2"], ["reload"], ["stop"], ["run-job", "x"]], ids=" ".join)
def test_control_commands_without_a_primary_exit_3(tmp_path: Path, command: list[str]) -> None:
    line = one_line(cli(tmp_path, *command, "--db", str(tmp_path / "state.db")), 3)
    assert "no running primary" in line and str(tmp_path / "state.db") in line


def test_a_socket_path_with_nothing_behind_it_exits_3(tmp_path: Path) -> None:
    line = one_line(cli(tmp_path, "status", "--socket", str(tmp_path / "gone.sock")), 3)
    assert str(tmp_path / "gone.sock") in line


def test_scale_refuses_bad_counts_with_exit_2(start_cluster: Callable[..., Cluster]) -> None:
    cluster = start_cluster(workers=1)
    for count in ["1e9", "100000", "+100000", "-100000", "0", "²", "abc", "9" * 5000, ""]:
        line = one_line(cluster.cli("scale", count), 2)
        assert "scale" in line, line
    assert "at least 1" in one_line(cluster.cli("scale", "-5"), 2), "the primary's refusal"
    assert cluster.status()["desired_workers"] == 1
    scaled = cluster.cli("scale", "0002")
    assert scaled.returncode == 0 and "desired workers: 2" in scaled.stdout, scaled.stderr


def test_output_into_a_closed_pipe_exits_quietly(start_cluster: Callable[..., Cluster]) -> None:
    cluster = start_cluster(workers=1)
    for command in (["status"], ["status", "--json"], ["history"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # like `| head -1` after its line: every write fails with EPIPE
        try:
            result = subprocess.run(
                [sys.executable, "-m", "runtime", *command, "--db", str(cluster.db)],
                cwd=cluster.cwd,
                env=cluster.env,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert result.stderr == "", f"{command}: {result.stderr}"
        assert result.returncode == 141, f"{command}: exit {result.returncode}"


def test_reload_whose_connection_closes_without_an_answer_says_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "hangup.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def hang_up() -> None:  # what a primary that dies mid-reload looks like from the CLI
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        result = cli(tmp_path, "reload", "--socket", str(path))
        thread.join(10)
    line = one_line(result, 1, "clusterctl-tui: reload interrupted:")
    assert "without answering" in line, line


# ---------------------------------------------------------------------------- the store is not there


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _text(path: Path) -> None:
    path.write_text("not a database\n" * 100)


def _other_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE job_runs (x)")
        conn.execute("CREATE TABLE webhook_deliveries (x)")
    conn.close()


def _unreadable(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file anyway")
    path.write_bytes(b"")
    path.chmod(0)


STORES = {
    "missing": (_missing, "no store"),
    "directory": (_directory, "directory"),
    "garbage-bytes": (_garbage, "not a database"),
    "text-file": (_text, "not a database"),
    "another-schema": (_other_schema, "cannot read store"),
    "unreadable": (_unreadable, "ermission denied"),
}


@pytest.mark.parametrize(
    "command", [["history"], ["history", "--json"], ["webhooks"], ["webhooks", "replay", "1"]], ids=" ".join
)
@pytest.mark.parametrize(("make", "needle"), list(STORES.values()), ids=list(STORES))
def test_history_and_webhooks_name_a_bad_store(
    tmp_path: Path, command: list[str], make: Callable[[Path], None], needle: str
) -> None:
    store = tmp_path / "state.db"
    make(store)
    line = one_line(cli(tmp_path, *command, "--db", str(store)), 2)
    assert str(store) in line and needle in line, line


def test_history_and_webhooks_after_the_store_was_deleted_under_a_primary(
    start_cluster: Callable[..., Cluster],
) -> None:
    cluster = start_cluster(workers=1)
    # Frozen, so that it cannot notice and make a new store before the CLI looks.
    os.kill(cluster.proc.pid, signal.SIGSTOP)
    try:
        for path in cluster.db.parent.glob("state.db*"):
            if not path.name.endswith(".sock"):
                path.unlink()
        for command in (["history"], ["webhooks"]):
            line = one_line(cluster.cli(*command), 2)
            assert str(cluster.db) in line and "no store" in line, line
    finally:
        os.kill(cluster.proc.pid, signal.SIGCONT)


# ---------------------------------------------------------------------------- check resolves secrets like up


def webhook_config(secret: str) -> str:
    return f'[[webhooks]]\nname = "ops"\nurl = "http://127.0.0.1:9/hook"\nevents = ["*"]\nsecret = "{secret}"\n'


@pytest.mark.parametrize(
    ("secret", "env", "needle", "value"),
    [
        ("whsec_hunter2!!", {}, "base64", "hunter2"),
        ("env:CLUSTERCTL_TEST_UNSET_SECRET", {}, "CLUSTERCTL_TEST_UNSET_SECRET", None),
        ("env:HOOK_SECRET", {"HOOK_SECRET": "hunter2"}, "whsec_", "hunter2"),
        ("env:HOOK_SECRET", {"HOOK_SECRET": "whsec_hunter2!!"}, "HOOK_SECRET", "hunter2"),
        ("file:{tmp}/no-such-secret", {}, "no-such-secret", None),
        ("file:{tmp}/secret.txt", {}, "secret.txt", "hunter2"),
    ],
    ids=["inline-not-base64", "env-unset", "env-no-prefix", "env-not-base64", "file-missing", "file-not-base64"],
)
def test_check_refuses_secrets_that_up_refuses(
    tmp_path: Path, secret: str, env: dict[str, str], needle: str, value: str | None
) -> None:
    (tmp_path / "secret.txt").write_text("whsec_hunter2!!\n")
    (tmp_path / "clusterctl.toml").write_text(webhook_config(secret.format(tmp=tmp_path)))
    result = cli(tmp_path, "check", env=env)
    line = one_line(result, 2)
    assert "'ops'" in line and needle in line, line
    if value is not None:
        assert value not in result.stdout + result.stderr


def test_check_accepts_a_good_secret_without_printing_it(tmp_path: Path) -> None:
    (tmp_path / "clusterctl.toml").write_text(webhook_config("env:HOOK_SECRET"))
    result = cli(tmp_path, "check", env={"HOOK_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "1 webhooks" in result.stdout
    assert SECRET.removeprefix("whsec_") not in result.stdout + result.stderr
