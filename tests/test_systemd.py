"""systemd: the notify protocol, socket activation across a restart of the primary, and `systemd-unit`."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import APPS, Cluster, Load, wait_for

from runtime.listeners import BindError, inherit
from runtime.systemd import Notifier, listen_fds

SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

# Worker n is ready about n-1 seconds after worker 1, so a READY=1 sent before the last one is ready
# would still find workers starting when the test asks.
STAGGERED_APP = """
import os, time
time.sleep(float(os.environ.get("CLUSTERCTL_WORKER_ID", "1")) - 1)
from asgi_app import app
"""

# What before_start (a child of the primary that is not a worker) sees of systemd's variables.
ENV_PROBE = f"""
import json, os, sys
names = {SYSTEMD_VARS!r} + ("CLUSTERCTL_INSTANCE_TYPE",)
open(sys.argv[1], "w").write(json.dumps({{k: os.environ[k] for k in names if k in os.environ}}))
"""

# systemd's side of socket activation: the listening socket at fd 3, LISTEN_PID our pid, then exec
# (which keeps the pid) the primary.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "runtime", *sys.argv[2:]])
"""


class NotifyReceiver:
    """systemd's end of NOTIFY_SOCKET: every datagram, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NotifyReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def fields(self) -> list[tuple[float, str]]:
        with self._lock:
            return [(at, field) for at, fields in self.messages for field in fields]

    def datagram_with(self, field: str, start: int = 0) -> list[str] | None:
        """The first datagram from the `start`-th on that carries `field`."""
        with self._lock:
            return next((fields for _, fields in self.messages[start:] if field in fields), None)


def _states(fields: list[tuple[float, str]]) -> list[str]:
    return [f for _, f in fields if f in ("READY=1", "RELOADING=1", "STOPPING=1")]


def test_notify_ready_status_watchdog_reload_and_stop(start_cluster, tmp_path):
    (tmp_path / "staggered_app.py").write_text(STAGGERED_APP)
    probe, seen = tmp_path / "env_probe.py", tmp_path / "before_start_env.json"
    probe.write_text(ENV_PROBE)
    config = (
        f"[app]\nbefore_start = [{json.dumps(sys.executable)}, {json.dumps(str(probe))}, {json.dumps(str(seen))}]\n"
    )
    with NotifyReceiver(tmp_path / "notify.sock") as notify:
        cluster = start_cluster(
            app="staggered_app:app",
            workers=3,
            config=config,
            env={
                "PYTHONPATH": f"{tmp_path}{os.pathsep}{APPS}",
                "NOTIFY_SOCKET": str(notify.path),
                "WATCHDOG_USEC": "1000000",
            },
            wait=False,
        )
        ready = wait_for(lambda: notify.datagram_with("READY=1"), 60, "READY=1")
        # Right away: READY=1 must mean every one of the first workers is ready.
        status = cluster.status()
        assert [w["state"] for w in status["workers"]] == ["ready"] * 3, status["workers"]
        assert any(f.startswith("STATUS=") and "3/3 workers ready, generation 1" in f for f in ready), ready
        before_ready = [f for _, f in notify.fields()][: [f for _, f in notify.fields()].index("READY=1")]
        assert any(f.startswith("STATUS=starting") for f in before_ready), before_ready
        assert not {"RELOADING=1", "STOPPING=1"} & set(before_ready)

        # Children never speak for the service: not the workers, not before_start.
        for worker in status["workers"]:
            environ = psutil.Process(worker["pid"]).environ()
            assert environ["CLUSTERCTL_INSTANCE_TYPE"] == "worker"
            assert not set(SYSTEMD_VARS) & set(environ), environ
        assert json.loads(seen.read_text()) == {"CLUSTERCTL_INSTANCE_TYPE": "primary"}

        # WATCHDOG_USEC=1s: a ping every half second, from the primary's loop.
        ready_at = next(at for at, f in notify.fields() if f == "READY=1")
        wait_for(lambda: sum(1 for at, f in notify.fields() if f == "WATCHDOG=1" and at > ready_at) >= 6, 10, "pings")
        pings = [at for at, f in notify.fields() if f == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert 0.4 <= sum(gaps) / len(gaps) <= 0.65, gaps
        assert max(gaps) < 1.0, gaps

        mark = len(notify.messages)
        result = cluster.cli("reload")
        assert result.returncode == 0, result.stderr
        reloading = notify.datagram_with("RELOADING=1", mark)
        assert reloading is not None and any(f.startswith("MONOTONIC_USEC=") for f in reloading), reloading
        after = [f for _, f in notify.fields()][sum(len(fields) for _, fields in notify.messages[:mark]) :]
        assert _states([(0.0, f) for f in after]) == ["RELOADING=1", "READY=1"], after
        reloaded = notify.datagram_with("READY=1", mark)
        assert reloaded is not None and any("3/3 workers ready, generation 2" in f for f in reloaded), reloaded

        mark = len(notify.messages)
        result = cluster.cli("stop")
        assert result.returncode == 0, result.stderr
        assert cluster.proc.wait(10) == 0
        stopping = notify.datagram_with("STOPPING=1", mark)
        assert stopping is not None, notify.messages[mark:]
        assert _states(notify.fields()) == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
        assert [f for f in stopping if f.startswith("STATUS=stopping")], stopping


def test_notifier_abstract_socket_and_environment(tmp_path):
    name = f"@clusterctl-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name[1:])
    receiver.settimeout(5)
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/x"}
    notifier = Notifier.from_environ(env)
    assert notifier is not None and notifier.watchdog_interval == 2.0
    assert env == {"HOME": "/x"}  # taken out, as sd_notify(unset_environment=1) does
    try:
        assert notifier.send("READY=1", "STATUS=two\nlines")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=two lines"
        receiver.close()
        assert notifier.send("WATCHDOG=1") is False  # no one listens: dropped, never raised
    finally:
        notifier.close()
    # A watchdog meant for another process (WATCHDOG_PID) is not ours to feed.
    other = Notifier.from_environ({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other is not None and other.watchdog_interval is None
    other.close()
    assert Notifier.from_environ({}) is None


def test_listen_fds_are_ours_only_for_our_pid_and_always_unset():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "http:https", "PATH": "/bin"}
    assert listen_fds(env) == [3, 4]
    assert env == {"PATH": "/bin"}
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}  # a socket-activated parent's, not ours
    assert listen_fds(env) == [] and env == {}
    assert listen_fds({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}) == []


def test_inherit_takes_listening_stream_sockets_and_refuses_the_rest():
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as idle:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        udp.bind(("127.0.0.1", 0))
        idle.bind(("127.0.0.1", 0))
        # inherit() owns what it is given (and closes it on refusal): hand it copies.
        listener = inherit([os.dup(tcp.fileno())])
        try:
            assert listener.address == f"127.0.0.1:{tcp.getsockname()[1]}"
            assert not os.get_inheritable(listener.socks[0].fileno())
        finally:
            listener.close()
        with pytest.raises(BindError, match="stream socket"):
            inherit([os.dup(udp.fileno())])
        with pytest.raises(BindError, match="not listening"):
            inherit([os.dup(idle.fileno())])
    read, write = os.pipe()
    try:
        with pytest.raises(BindError, match="not a socket"):
            inherit([read])
    finally:
        os.close(read)
        os.close(write)


class FreshConnectionLoad(Load):
    """Clients that open a new connection for every request (as most clients of a restarted site do)."""

    slowest = 0.0  # seconds: the longest request, one that waited in the backlog for the next primary

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                pid = json.loads(body)["pid"]
                with self._lock:
                    self.ok += 1
                    self.by_pid[pid] = self.by_pid.get(pid, 0) + 1
                    self.slowest = max(self.slowest, time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - every kind of failure is a dropped request
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()


def test_socket_activation_restart_of_the_primary_drops_nothing(tmp_path):
    """The socket outlives the primary (systemd holds it; here, the test): connections wait in its backlog."""
    env = {**os.environ, "PYTHONPATH": str(APPS)}
    for name in SYSTEMD_VARS:
        env.pop(name, None)
    db = tmp_path / "state.db"
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(128)
    port = held.getsockname()[1]
    clusters: list[Cluster] = []

    def launch() -> Cluster:
        log = tmp_path / f"primary-{len(clusters)}.log"
        # --bind names the very port systemd holds: a primary that tried to bind it would fail to start.
        up = ["up", "--headless", "--bind", f"127.0.0.1:{port}", "--db", str(db), "--app", "asgi_app:app"]
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(held.fileno()), *up, "--workers", "2"],
            pass_fds=(held.fileno(),),
            cwd=tmp_path,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        cluster = Cluster(proc, port, db, tmp_path, log, env)
        clusters.append(cluster)
        try:
            workers = cluster.wait_ready(2, timeout=30)
        except AssertionError:
            raise AssertionError(f"primary did not start:\n{cluster.output()}") from None
        assert "serving the socket systemd passed in (LISTEN_FDS=1" in cluster.output()
        for worker in workers:
            assert not set(SYSTEMD_VARS) & set(psutil.Process(worker["pid"]).environ())
        return cluster

    try:
        first = launch()
        first_pids = {w["pid"] for w in first.status()["workers"]}
        with FreshConnectionLoad(port) as load:
            load.wait_requests(200)
            result = first.cli("stop")
            assert result.returncode == 0, result.stderr
            assert first.proc.wait(10) == 0
            second = launch()
            second_pids = {w["pid"] for w in second.status()["workers"]}
            load.wait_requests(200)
        total = load.ok + len(load.failures)
        print(f"socket activation restart: {len(load.failures)}/{total} failed, slowest {load.slowest:.2f}s")
        assert load.failures == [], f"{len(load.failures)}/{total} failed: {load.failures[:5]}"
        assert first_pids & set(load.by_pid) and second_pids & set(load.by_pid), (first_pids, second_pids, load.by_pid)
        assert second.cli("stop").returncode == 0
    finally:
        for cluster in clusters:
            cluster.kill_everything()
        held.close()


def _unit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "systemd-unit", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _section(text: str, name: str) -> dict[str, str]:
    lines = text.splitlines()
    start = lines.index(f"[{name}]") + 1
    body = lines[start : next((i for i in range(start, len(lines)) if lines[i].startswith(("[", "#"))), len(lines))]
    return dict(line.split("=", 1) for line in body if line)


def test_systemd_unit_for_the_current_config(tmp_path):
    home = tmp_path / "my site"  # a space: ExecStart= must quote it
    home.mkdir()
    (home / "clusterctl.toml").write_text(
        '[app]\ntarget = "asgi_app:app"\n[server]\nbind = "127.0.0.1:8123"\ngraceful_timeout = 20\n'
    )
    result = _unit(home, "--db", "data/state.db", "--workers", "3")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("# ---- clusterctl-tui.service ----\n") and ".socket" not in text
    unit, service, install = _section(text, "Unit"), _section(text, "Service"), _section(text, "Install")
    assert unit["After"] == "network.target" and "asgi_app:app" in unit["Description"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert shlex.split(service["ExecStart"]) == [
        sys.executable,
        "-m",
        "clusterctl_tui",
        "up",
        "--headless",
        "--config",
        str(home / "clusterctl.toml"),
        "--db",
        str(home / "data" / "state.db"),
        "--workers",
        "3",
    ]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed" and service["Restart"] == "on-failure"
    assert service["TimeoutStopSec"] == "35" and service["WatchdogSec"] == "30"
    assert service["WorkingDirectory"] == str(home)
    assert install == {"WantedBy": "multi-user.target"}

    with_socket = _unit(home, "--db", "data/state.db", "--socket")
    assert with_socket.returncode == 0, with_socket.stderr
    service_part, socket_part = with_socket.stdout.split("# ---- clusterctl-tui.socket ----\n")
    assert _section(service_part, "Unit")["Requires"] == "clusterctl-tui.socket"
    assert "clusterctl-tui.socket" in _section(service_part, "Unit")["After"]
    listen = _section(socket_part, "Socket")
    assert listen["ListenStream"] == "127.0.0.1:8123" and "SocketMode" not in listen
    assert _section(socket_part, "Install") == {"WantedBy": "sockets.target"}

    unix = _unit(home, "--socket", "--bind", "unix:run/app.sock")
    assert unix.returncode == 0, unix.stderr
    listen = _section(unix.stdout.split("# ---- clusterctl-tui.socket ----\n")[1], "Socket")
    assert listen["ListenStream"] == str(home / "run" / "app.sock") and listen["SocketMode"] == "0660"
    assert "--bind unix:run/app.sock" in _section(unix.stdout, "Service")["ExecStart"]

    refused = _unit(home, "--socket", "--bind", "localhost:0")
    assert refused.returncode == 2 and "ListenStream= needs an IP address" in refused.stderr
