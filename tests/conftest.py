"""Shared fixtures: real primaries on free ports, polled with deadlines, cleaned up by PID."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

APPS = Path(__file__).parent / "apps"
PG_URL = "CLUSTERCTL_TEST_PG_URL"  # exported by `tests/pg.sh start`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll until `predicate()` is truthy; fail the test with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (AssertionError, OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


async def until(pilot: Any, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """`wait_for` for a console under Pilot: polls between the app's own frames."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def endpoints(db: Path) -> dict[str, int]:
    """The webhook endpoints a store has published: name -> enabled."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT name, enabled FROM webhook_endpoints").fetchall())
    finally:
        conn.close()


OPENER = """
import sys, time
from pathlib import Path
from runtime.store import open_store_url

go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
open_store_url(sys.argv[1]).close()
"""


def open_together(where: str, go: Path, count: int) -> list[str]:
    """`count` processes open the store at `where` (a path or a URL) at the same moment, as primaries
    starting together do; the stderr of each one that failed."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, where, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()  # every opener is past its imports: they all start now
        outcomes = [(proc.communicate(timeout=60), proc.returncode) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [err for (_out, err), code in outcomes if code != 0]


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    port: int
    db: Path
    cwd: Path
    log: Path
    env: dict[str, str]
    seen_pids: set[int] = field(default_factory=set)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime", *args, "--db", str(self.db)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json", timeout=20)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        self.seen_pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    def settled(self, workers: int | None) -> bool:
        """`workers` ready (None: as many as the primary wants)."""
        status = self.status()
        ready = [w for w in status["workers"] if w["state"] == "ready"]
        return len(ready) == (status["desired_workers"] if workers is None else workers)

    def ready_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.status()["workers"] if w["state"] == "ready"]

    def wait_ready(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        def settled() -> list[dict[str, Any]] | None:
            workers = self.status()["workers"]
            ready = [w for w in workers if w["state"] == "ready"]
            return ready if len(ready) == count and len(workers) == count else None

        return wait_for(settled, timeout, f"{count} ready workers and nothing else")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_events(self) -> list[dict[str, Any]]:
        import sqlite3

        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM worker_events ORDER BY id")]
        finally:
            conn.close()

    def kill_everything(self) -> None:
        """End the primary and every worker we ever saw, by PID."""
        pids = set(self.seen_pids)
        try:
            pids.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                if proc.environ().get("CLUSTERCTL_PRIMARY_PID") == str(self.proc.pid):
                    proc.kill()
            except psutil.Error:
                pass


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def start(
        *extra: str,
        app: str = "asgi_app:app",
        workers: int | None = 2,  # None: no --workers flag (the config file's count, which a reload re-reads)
        config: str | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        db: Path | None = None,
        port: int | None = None,
    ) -> Cluster:
        port = port or free_port()
        db = db or tmp_path / "state.db"
        full_env = {**os.environ, "PYTHONPATH": str(APPS), **(env or {})}
        args = [sys.executable, "-m", "runtime", "up", "--headless", "--bind", f"127.0.0.1:{port}", "--db", str(db)]
        args += ["--app", app] + (["--workers", str(workers)] if workers is not None else [])
        if config is not None:
            path = tmp_path / f"clusterctl-{len(clusters)}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        log = tmp_path / f"primary-{len(clusters)}.log"
        proc = subprocess.Popen(
            [*args, *extra], cwd=tmp_path, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        cluster = Cluster(proc, port, db, tmp_path, log, full_env)
        clusters.append(cluster)
        if wait:
            try:
                wait_for(lambda: proc.poll() is not None or cluster.settled(workers), 30, "cluster up")
            except AssertionError:
                raise AssertionError(f"cluster did not start:\n{cluster.output()}") from None
            assert proc.poll() is None, f"primary exited:\n{cluster.output()}"
        return cluster

    yield start
    for cluster in clusters:
        cluster.kill_everything()


class Load:
    """Keep-alive clients hammering a port from threads; every failure is counted, none retried."""

    def __init__(self, port: int, clients: int = 8, path: str = "/", new_connection: bool = False) -> None:
        self.port = port
        self.path = path
        self.new_connection = (
            new_connection  # a connection per request (`Connection: close`), as from a proxy without keep-alive
        )
        self.ok = 0
        self.failures: list[str] = []
        self.by_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path, headers={"Connection": "close"} if self.new_connection else {})
                response = conn.getresponse()
                body = response.read()
                if self.new_connection:
                    conn.close()
                if response.status >= 500:
                    raise RuntimeError(f"HTTP {response.status}")
                pid = json.loads(body).get("pid") if body.startswith(b"{") else None
                with self._lock:
                    self.ok += 1
                    if pid:
                        self.by_pid[pid] = self.by_pid.get(pid, 0) + 1
            except Exception as exc:  # noqa: BLE001 - every kind of failure is a dropped request
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def wait_requests(self, count: int, timeout: float = 20) -> None:
        start = self.ok
        wait_for(lambda: self.ok - start >= count, timeout, f"{count} more requests under load")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def port_free(port: int) -> bool:
    """Another server could listen here now (SO_REUSEADDR, as servers do: TIME_WAIT is no owner)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def send_signal(cluster: Cluster, sig: signal.Signals) -> None:
    os.kill(cluster.proc.pid, sig)


# ---------------------------------------------------------------------------- PostgreSQL (tests/pg.sh)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The test server's superuser URL. Under CI its absence is a failure: those tests never skip there."""
    url = os.environ.get(PG_URL)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_URL} is not set: .ci/run starts PostgreSQL with tests/pg.sh")
        pytest.skip(f'no PostgreSQL for this test: eval "$(tests/pg.sh start)" first ({PG_URL})')
    return url


def database_url(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A new, empty database on the test server for this test alone, dropped afterwards."""
    import psycopg

    name = f"clusterctl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield database_url(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
