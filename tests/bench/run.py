#!/usr/bin/env python3
"""Benchmark clusterctl-tui against gunicorn and uvicorn on a plain ASGI app: the one command.

    python tests/bench/run.py [--quick] [--python PATH] [--servers ...] [--phases ...] [--json PATH] [--keep-logs]

Every server runs tests/bench/plain_app.py (`/`: 200 `ok`; `/slow`: the same after a
fixed amount of hashing, ~2 ms; `x-pid` on every response) on 127.0.0.1:<free port>
with the same uvicorn flavour (httptools + uvloop) and keep-alive timeout (5 s).
Four phases, in this order, then one table:

  throughput (2 workers, and 1): rounds, each running every cell once in a shuffled
  order; a cell is one server and one path, on a FRESH server: start it, wait for an
  idle machine (other processes under 10% for a second, at most 20 s), warm up 1 s,
  measure 2 s, stop it. Medians with min-max, in requests/s and in the server's CPU
  time per request; a run disturbed by other processes is run again:
    d. requests/s, `wrk -t2 -c64` keep-alive, on `/` and `/slow`, at 2 workers for
       ours, gunicorn and uvicorn; p99 latency on `/slow`; our ratio to each peer;
    e. one worker: ours `--workers 1` against one plain `uvicorn` process;
    f. the metrics middleware: one plain uvicorn process serving
       `MetricsMiddleware(runtime.demo:app)` (metrics_app.py) against the same
       command serving the bare demo app; and middleware_micro.py, the app called
       in-process with and without it (no server, no network);
    c. balance at 2 workers (as below), on the `/` cells' servers of the first rounds.
  restarts (fresh servers):
    j. kill -9 of one worker until a fresh connection is served by its replacement,
       at 2 workers (probes every 2 ms) and at 1 (one request waits in the backlog);
    m. reload of 4 idle workers: ours `python -m runtime reload` end to end (with
       `health_path = "/"`), the peers SIGHUP until every pid is new and one serves.
  cluster (4 workers, rep 1: ours, gunicorn, uvicorn, ours with preload_app; rep 2: ...):
    k. new connection per request: `wrk -t2 -c64 -H "Connection: close"` on `/`;
    l. USS and PSS per worker right after k's load, and our fork server's USS;
    a. rolling restart under keep-alive load: `wrk -t2 -c64` on `/` for the whole
       window, 3 consecutive reloads in it; failed requests = wrk socket errors
       (connect/read/write/timeout) + non-2xx/3xx responses.
    b. kill -9 of one worker: time until the replacement is up (ours: `status`
       shows the slot with a new pid in state "ready"; peers: psutil shows a new
       child of the master) and until the port answers a request served by it.
    c. balance: per-worker request counts under `wrk -t2 -c64` keep-alive load,
       max/min ratio.
  scripts: scheduler_lateness.py (g), webhooks.py (h) and console_cost.py (i),
  each run as a child process; their printed figures are parsed into the table.

Load and every probe go to 127.0.0.1 only. Every process this script starts is
ended by PID on exit, Ctrl+C or error.

Needs `wrk` (Debian: `apt-get install wrk`). The servers run in a bench venv
(tests/bench/.bench-venv, made on first use: the project editable, gunicorn,
uvicorn-worker) unless `--python` names an env that has them. This script
itself needs only the stdlib and psutil; if the Python running it lacks psutil
it re-runs itself with the bench venv's Python.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # bootstrapped below: re-run under the bench venv
    psutil = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BENCH_VENV = HERE / ".bench-venv"
LUA_PIDS = HERE / "pid_counts.lua"
APP = "plain_app:app"  # tests/bench/plain_app.py: `/`, `/slow` (fixed CPU work), `/pid` (for pid_counts.lua)
DEMO_APP = "runtime.demo:app"  # figure f only: what metrics_app.py and middleware_micro.py wrap
METRICS_APP = "metrics_app:app"  # tests/bench/metrics_app.py: the demo app inside our MetricsMiddleware
HOST = "127.0.0.1"
WORKERS = 4
VICTIM_AGE = 13.0  # s since spawn: ready 10 s or more, past our primary's crash-loop window (STABLE_AFTER)
KEEPALIVE = 5  # seconds, the same for every server (ours defaults to 5, uvicorn 5, gunicorn 2)
SERVERS = ("ours", "gunicorn", "uvicorn")
PHASES = ("throughput", "restarts", "cluster", "scripts")
TPUT_WORKERS = 2  # the machine this was written for has 2 cores
TPUT_PATHS = ("/", "/slow")  # plain_app's trivial endpoint and its fixed ~2 ms of CPU
BALANCE_PATH = "/pid"  # plain_app answers {"pid": N} here, what pid_counts.lua reads
DISTURBED_PCT = 10.0  # % of the machine other processes may use during a throughput run before it is run again
IDLE_PCT = 10.0  # before a cell: wait until other processes used less than this % of the machine for 1 s ...
IDLE_WAIT = 20.0  # ... but no longer than this, in seconds
# Figure j's cells, (server, workers): no uvicorn at 1, since `uvicorn --workers 1` does not supervise its worker.
KILL_CELLS = (("ours", 2), ("ours", 1), ("gunicorn", 2), ("gunicorn", 1), ("uvicorn", 2))
RELOAD_HEALTH_PATH = "/"  # ours in figure m: each new worker is health-checked before it accepts
MIB = 1024 * 1024
NEEDED_IN_ENV = ("runtime", "gunicorn", "uvicorn_worker", "uvicorn", "uvloop", "httptools", "psutil")


# ---------------------------------------------------------------- processes we own


class Owned:
    """Every process this script starts, ended by PID (its recorded descendants too) on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.descendants: dict[int, set[int]] = {}
        self.lock = threading.Lock()

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # A session of its own: a Ctrl+C in the terminal reaches only us, and we stop them in order.
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        with self.lock:
            self.procs.append(proc)
        return proc

    def remember_children(self, proc: subprocess.Popen[bytes]) -> None:
        """Note the live descendants (workers) of a server, so they can be ended by PID later."""
        with contextlib.suppress(psutil.Error):
            kids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            self.descendants.setdefault(proc.pid, set()).update(kids)

    def stop(self, proc: subprocess.Popen[bytes], graceful: float = 15.0) -> None:
        self.remember_children(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(graceful)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        for pid in self.descendants.pop(proc.pid, set()):
            _kill_if_descendant_of(pid, proc.pid)
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, graceful=5.0)


def _kill_if_descendant_of(pid: int, root: int) -> None:
    """SIGKILL a leftover worker we recorded, unless its pid has been reused by someone else's process."""
    try:
        proc = psutil.Process(pid)
        env = {}
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
        ours = env.get("BENCH_OWNER") == str(os.getpid()) or env.get("CLUSTERCTL_PRIMARY_PID") == str(root)
        if ours:
            proc.kill()
    except psutil.Error:
        pass


OWNED = Owned()


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")


def get_pid(port: int, timeout: float = 2.0) -> int:
    """One request on a fresh connection; the pid of the worker that served it.

    plain_app says it in an `x-pid` header; the demo app (figure f's cells) in its JSON body.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"status {response.status}")
        header = response.getheader("x-pid")
        return int(header) if header else int(json.loads(body)["pid"])
    finally:
        conn.close()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- wrk


WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(\w+),")
WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_PID = re.compile(r"^BENCH_PID (\d+) (\d+)$", re.M)
WRK_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", re.M)  # in the `--latency` distribution
WRK_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class WrkResult:
    requests: int = 0
    rps: float = 0.0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non2xx: int = 0
    p99_ms: float | None = None
    per_pid: dict[int, int] = field(default_factory=dict)
    output: str = ""

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def failed(self) -> int:
        return self.socket_errors + self.non2xx

    def breakdown(self) -> str:
        return (
            f"connect {self.connect}, read {self.read}, write {self.write}, "
            f"timeout {self.timeout}, non-2xx {self.non2xx}"
        )


def parse_wrk(text: str) -> WrkResult:
    result = WrkResult(output=text)
    if m := WRK_ERRORS.search(text):
        result.connect, result.read, result.write, result.timeout = map(int, m.groups())
    if m := WRK_NON2XX.search(text):
        result.non2xx = int(m.group(1))
    if m := WRK_TOTAL.search(text):
        result.requests = int(m.group(1))
    if m := WRK_RPS.search(text):
        result.rps = float(m.group(1))
    if m := WRK_P99.search(text):
        result.p99_ms = float(m.group(1)) * WRK_UNIT_MS[m.group(2)]
    result.per_pid = {int(pid): int(n) for pid, n in WRK_PID.findall(text)}
    return result


class Wrk:
    """`wrk -t2 -c64` against `path` (`/`), in the background; `finish()` waits and parses its report.

    `stop()` ends a run early with SIGINT, on which wrk still prints its full report
    for the time it ran: the reload scenario sizes its window to the reloads.
    `close=True` sends `Connection: close`: a new connection for every request.
    """

    def __init__(
        self, port: int, duration: float, script: Path | None = None, out: Path | None = None, path: str = "/",
        close: bool = False,
    ) -> None:  # fmt: skip
        args = ["wrk", "-t2", "-c64", f"-d{max(1, round(duration))}s", "--latency"]
        if close:
            args += ["-H", "Connection: close"]
        if script is not None:
            args += ["-s", str(script)]
        args.append(f"http://{HOST}:{port}{path}")
        self.args = args
        self.out = out
        self.proc = OWNED.popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 150) -> WrkResult:
        try:
            stdout, _ = self.proc.communicate(timeout=timeout)
        finally:
            OWNED.stop(self.proc, graceful=2)
        text = stdout.decode(errors="replace")
        if self.out is not None:
            self.out.write_text(" ".join(self.args) + "\n" + text)
        if self.proc.returncode != 0:
            raise RuntimeError(f"wrk exited {self.proc.returncode}:\n{text}")
        return parse_wrk(text)


# ---------------------------------------------------------------- servers


class Server:
    name = "?"

    def __init__(self, python: str, workdir: Path, workers: int = WORKERS, app: str = APP) -> None:
        self.python = python
        self.workdir = workdir
        self.workers = workers
        self.app = app
        self.port = free_port()
        self.stderr_path = workdir / f"{self.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        # tests/bench on the path of every server: plain_app, metrics_app, peer_worker
        self.env = {**os.environ, "BENCH_OWNER": str(os.getpid()), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HERE)}

    # the differences between the servers
    def command(self) -> list[str]:
        raise NotImplementedError

    def worker_pids(self) -> set[int]:
        """The pids of the workers that serve (or will serve) requests."""
        assert self.proc is not None
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return set()
        pids = set()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(kid.cmdline())
                if "resource_tracker" in cmdline or "semaphore_tracker" in cmdline:
                    continue
                if kid.status() == psutil.STATUS_ZOMBIE:
                    continue
                pids.add(kid.pid)
        return pids

    def reload(self) -> None:
        """One rolling restart, returning when it is done."""
        raise NotImplementedError

    def helper_pids(self) -> set[int]:
        """Processes of the server's own that are neither the top process nor a worker (ours: the fork server)."""
        return set()

    # shared
    def start(self, settle: float = 1.0) -> None:
        """Start the server and wait until every worker is there and one request is answered.

        `settle`: then wait this long, so that every worker has imported the app and is
        accepting (a few fresh connections reach them). A caller that waits anyway (the
        idle check) passes 0.
        """
        with self.stderr_path.open("ab") as stderr:
            self.proc = OWNED.popen(
                self.command(), cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            wait_for(lambda: self._exited_early() or self.is_up(), 60, f"{self.name} up", interval=0.1)
            self._exited_early()
            time.sleep(settle)
        except BaseException:
            self.stop()
            raise
        OWNED.remember_children(self.proc)

    def _exited_early(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n{tail}")
        return False

    def is_up(self) -> bool:
        if len(self.worker_pids()) != self.workers:
            return False
        get_pid(self.port)
        return True

    def stop(self) -> None:
        if self.proc is not None:
            OWNED.stop(self.proc, graceful=20)
            self.proc = None

    def wait_new_generation(self, old: set[int], timeout: float = 90) -> None:
        """Done when the worker pids are all new and there are `workers` of them again (psutil children)."""

        def done() -> bool:
            pids = self.worker_pids()
            return len(pids) == self.workers and not (pids & old)

        wait_for(done, timeout, f"{self.name}: a new set of {self.workers} workers", interval=0.02)
        assert self.proc is not None
        OWNED.remember_children(self.proc)

    def memory(self) -> dict[str, Any]:
        """USS and PSS (psutil's memory_full_info) of each worker and helper process, and the workers' medians."""
        workers = _memory_of(self.worker_pids())
        return {
            "workers": workers,
            "helpers": _memory_of(self.helper_pids()),
            "uss": median([w["uss"] for w in workers]),
            "pss": median([w["pss"] for w in workers]),
        }


def _memory_of(pids: set[int]) -> list[dict[str, int]]:
    """USS (pages only this process maps), PSS (its share of all it maps) and RSS of each process, in bytes."""
    rows = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            rows.append({"pid": pid, "uss": info.uss, "pss": info.pss, "rss": info.rss})
    return rows


class Ours(Server):
    name = "ours"

    def __init__(
        self, python: str, workdir: Path, workers: int = WORKERS, app: str = APP, preload: bool = False,
        health_path: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(python, workdir, workers, app)
        self.db = workdir / "state.db"
        self.preload = preload
        self.health_path = health_path
        script = Path(python).parent / "clusterctl-tui"
        self.cli = [str(script)] if script.exists() else [python, "-m", "runtime"]

    def start(self, settle: float = 1.0) -> None:
        # A config file in the working directory, with the values the peers get, plus what a
        # figure asks for (preload_app for l, health_path for m). With none, the bundled demo
        # app would also switch on its extras (a job every minute, a webhook to itself on
        # every cluster event), work the peers would not be doing.
        config = f"# written by tests/bench/run.py\n[server]\nkeepalive_timeout = {KEEPALIVE}\ngraceful_timeout = 30\n"
        if self.preload:
            config += "preload_app = true\n"
        if self.health_path:
            config += f"health_path = {json.dumps(self.health_path)}\n"
        (self.workdir / "clusterctl.toml").write_text(config)
        super().start(settle)

    def command(self) -> list[str]:
        return [self.python, "-m", "runtime", "up", "--headless", "--app", self.app, "--bind", f"{HOST}:{self.port}",
                "--workers", str(self.workers), "--db", str(self.db)]  # fmt: skip

    def helper_pids(self) -> set[int]:
        """The fork server: a child of the primary that is not a worker slot."""
        assert self.proc is not None
        workers = {w["pid"] for w in self.status()["workers"] if w["pid"]}
        found = set()
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    if child.pid not in workers and "runtime.forkserver" in child.cmdline():
                        found.add(child.pid)
        return found

    def is_up(self) -> bool:
        ready = [w for w in self.status()["workers"] if w["state"] == "ready"]
        if len(ready) != self.workers:
            return False
        get_pid(self.port)
        return True

    def status(self) -> dict[str, Any]:
        """The object `clusterctl-tui status --json` prints.

        Asked over the control socket directly (one JSON line each way, the same
        request the CLI sends): a CLI process costs ~150 ms to start, too coarse for
        a 10 ms poll. Falls back to the CLI if the socket is not where we expect it.
        """
        assert self.proc is not None
        path = self.db.with_name(f"{self.db.name}.{self.proc.pid}.sock")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(b'{"cmd": "status", "args": {}}\n')
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        break
                    data += chunk
            reply = json.loads(data)
            if reply.get("ok") and "workers" in reply.get("result", {}):
                return reply["result"]
        except (OSError, ValueError):
            pass
        return self.status_cli()

    def status_cli(self) -> dict[str, Any]:
        result = subprocess.run(
            [*self.cli, "status", "--json", "--db", str(self.db)],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise OSError(f"status --json failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.status()["workers"] if w["pid"] and w["state"] != "draining"}

    def reload(self) -> None:
        result = subprocess.run(
            [*self.cli, "reload", "--db", str(self.db)],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"clusterctl-tui reload exited {result.returncode}: {result.stderr.strip()}")
        assert self.proc is not None
        OWNED.remember_children(self.proc)


class Gunicorn(Server):
    name = "gunicorn"

    def command(self) -> list[str]:
        return [self.python, "-m", "gunicorn", "-k", "peer_worker.HttptoolsUvloopWorker", "-w", str(self.workers),
                "-b", f"{HOST}:{self.port}", "--keep-alive", str(KEEPALIVE), "--graceful-timeout", "30",
                self.app]  # fmt: skip

    def reload(self) -> None:
        old = self.worker_pids()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_new_generation(old)


class Uvicorn(Server):
    name = "uvicorn"

    def command(self) -> list[str]:
        return [self.python, "-m", "uvicorn", self.app, "--host", HOST, "--port", str(self.port),
                "--workers", str(self.workers), "--http", "httptools", "--loop", "uvloop",
                "--timeout-keep-alive", str(KEEPALIVE), "--no-access-log"]  # fmt: skip

    def reload(self) -> None:
        old = self.worker_pids()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_new_generation(old)


class UvicornSingle(Server):
    """One plain uvicorn process, no `--workers`: it binds, accepts and serves by itself."""

    name = "uvicorn-single"

    def __init__(self, python: str, workdir: Path, workers: int = 1, app: str = APP) -> None:
        super().__init__(python, workdir, 1, app)

    def command(self) -> list[str]:
        return [self.python, "-m", "uvicorn", self.app, "--host", HOST, "--port", str(self.port),
                "--http", "httptools", "--loop", "uvloop", "--timeout-keep-alive", str(KEEPALIVE),
                "--no-access-log"]  # fmt: skip

    def worker_pids(self) -> set[int]:
        return set() if self.proc is None or self.proc.poll() is not None else {self.proc.pid}


SERVER_CLASSES = {"ours": Ours, "gunicorn": Gunicorn, "uvicorn": Uvicorn}


# ---------------------------------------------------------------- scenarios


def scenario_reload(server: Server, reloads: int, out: Path) -> dict[str, Any]:
    """(a) wrk -t2 -c64 on `/` for the whole window; `reloads` consecutive rolling restarts inside it.

    The window is 1 s of load, the reloads one after the other (each waited for), then
    1 s more; wrk is started with a long -d and stopped by SIGINT at the end of it.
    """
    lead, tail, longest = 1.0, 1.0, 120
    wrk = Wrk(server.port, longest, out=out)
    durations: list[float] = []
    error = None
    try:
        time.sleep(lead)
        for _ in range(reloads):
            t0 = time.monotonic()
            server.reload()
            durations.append(time.monotonic() - t0)
        time.sleep(tail)
    except Exception as exc:  # report it, still collect wrk's numbers
        error = f"{type(exc).__name__}: {exc}"
    window = time.monotonic() - wrk.started
    wrk.stop()
    result = wrk.finish()
    return {
        "failed": result.failed,
        "socket_errors": result.socket_errors,
        "connect": result.connect,
        "read": result.read,
        "write": result.write,
        "timeout": result.timeout,
        "non2xx": result.non2xx,
        "requests": result.requests,
        "rps": result.rps,
        "window_s": round(window, 1),
        "reload_s": [round(d, 2) for d in durations],
        "reloads_inside_window": window < longest - 1,
        "error": error,
    }


def scenario_kill(server: Server, kills: int, min_age: float) -> list[dict[str, Any]]:
    """(b) SIGKILL one worker; time until its replacement is up, and until a request is served by it."""
    samples = []
    for _ in range(kills):
        wait_for(lambda: server.is_up(), 60, f"{server.name} back to {server.workers} workers")
        samples.append(_one_kill(server, min_age))
    return samples


def _one_kill(server: Server, min_age: float) -> dict[str, Any]:
    """Kill the oldest worker, once it is `min_age` seconds old.

    Our primary treats a worker that dies less than 10 s after it became ready as a
    possible crash loop and holds its slot back (0.5 s, doubling) before respawning;
    the peers have no such rule. The main figure is the normal case, a worker that
    had been serving for a while, so our victims are VICTIM_AGE s old (the peers'
    are killed as they come: age changes nothing for them). A second figure kills
    a worker right after a reload, where the back-off applies.
    """
    if isinstance(server, Ours):
        workers = [w for w in server.status()["workers"] if w["state"] == "ready"]
        before = {w["pid"] for w in workers}
    else:
        before = server.worker_pids()
    victim, age = _oldest(before, min_age)
    slot = None
    if isinstance(server, Ours):
        slot = next(w["id"] for w in server.status()["workers"] if w["pid"] == victim)

    found: dict[str, Any] = {"up": None, "serving": None, "new_pid": None}
    stop = threading.Event()
    deadline = 20.0

    def watch_up() -> None:
        while not stop.is_set() and time.monotonic() - t0 < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
                if isinstance(server, Ours):
                    row = [w for w in server.status()["workers"] if w["id"] == slot and w["pid"] not in before]
                    if row and row[0]["state"] == "ready":
                        found["up"] = time.monotonic() - t0
                        found["new_pid"] = row[0]["pid"]
                        return
                else:
                    new = server.worker_pids() - before
                    if new:
                        found["up"] = time.monotonic() - t0
                        found["new_pid"] = min(new)
                        return
            time.sleep(0.01)

    def watch_serving() -> None:
        while not stop.is_set() and time.monotonic() - t0 < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
                if get_pid(server.port, timeout=1.0) not in before:
                    found["serving"] = time.monotonic() - t0
                    return
            time.sleep(0.01)

    threads = [threading.Thread(target=watch_up, daemon=True), threading.Thread(target=watch_serving, daemon=True)]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline + 5)
    stop.set()
    assert server.proc is not None
    OWNED.remember_children(server.proc)
    return {"victim": victim, "victim_age_s": round(age, 1), **found}


def _oldest(pids: set[int], min_age: float) -> tuple[int, float]:
    """The oldest of `pids` and its age in seconds, once it is at least `min_age` old (sleeping until then)."""
    born = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            born[pid] = psutil.Process(pid).create_time()
    victim = min(born, key=born.__getitem__)
    age = time.time() - born[victim]
    if age < min_age:
        time.sleep(min_age - age)
        age = min_age
    return victim, age


def scenario_balance(server: Server, duration: float, out: Path) -> dict[str, Any]:
    """(c) wrk -t2 -c64 keep-alive load; requests per worker, max/min."""
    before_pids = server.worker_pids()
    before = _ours_counts(server) if isinstance(server, Ours) else {}
    result = Wrk(server.port, duration, script=LUA_PIDS, out=out, path=BALANCE_PATH).finish()
    report: dict[str, Any] = {"rps": result.rps, "requests": result.requests, "failed": result.failed}
    lua = {pid: result.per_pid.get(pid, 0) for pid in before_pids}
    extra = {pid: n for pid, n in result.per_pid.items() if pid not in before_pids}
    report["lua_counts"] = sorted(lua.values(), reverse=True)
    if extra:
        report["lua_unknown_pids"] = extra
    report["lua_ratio"] = _ratio(list(lua.values()))
    if isinstance(server, Ours):
        # requests_total arrives with the workers' heartbeats (1/s): wait for one after the load ends.
        time.sleep(1.6)
        after = _ours_counts(server)
        counts = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in before_pids}
        report["counts"] = sorted(counts.values(), reverse=True)
        report["ratio"] = _ratio(list(counts.values()))
        report["source"] = "status --json requests_total (lua cross-check in lua_*)"
    else:
        report["counts"] = report["lua_counts"]
        report["ratio"] = report["lua_ratio"]
        report["source"] = "wrk lua pid counts"
    return report


def _ours_counts(server: Ours) -> dict[int, int]:
    return {w["pid"]: w["requests_total"] for w in server.status()["workers"] if w["pid"]}


def _ratio(counts: list[int]) -> float | None:
    if not counts:
        return None
    low = min(counts)
    return float("inf") if low == 0 else max(counts) / low


def scenario_newconn(server: Server, seconds: float, out: Path) -> dict[str, Any]:
    """(k) `wrk -t2 -c64 -H "Connection: close"` on `/`: a new connection for every request.

    After an idle check and 1 s of the same load as a warm-up. Also the server's CPU per
    request, and what other processes used, as in the throughput phase (CpuShare).
    """
    idle = wait_idle()
    Wrk(server.port, 1, close=True).finish()
    cpu = CpuShare(server)
    result = Wrk(server.port, seconds, out=out, close=True).finish()
    share = cpu.stop()
    cpu_us = round(1e6 * share["server_cpu_s"] / result.requests, 1) if result.requests else None
    return {"rps": result.rps, "requests": result.requests, "failed": result.failed, "connect": result.connect,
            "read": result.read, "write": result.write, "timeout": result.timeout, "non2xx": result.non2xx,
            "cpu_us": cpu_us, **share, **idle}  # fmt: skip


def kill_to_serving(server: Server, min_age: float) -> dict[str, Any]:
    """(j) SIGKILL the oldest worker; time until a request on a fresh connection is answered by a new pid.

    Fresh connections every 2 ms, each waiting up to 10 s for its answer. With 2 workers
    the survivor answers them until the replacement takes one; with 1 worker the first
    request sent after the kill waits in the listen backlog (the socket belongs to the
    primary or master) until the replacement accepts and answers it. Ours waits for a
    victim `min_age` old, as in `_one_kill`.
    """
    wait_for(server.is_up, 60, f"{server.name} back to {server.workers} workers")
    time.sleep(0.3)  # pacing: the last replacement has settled
    before = server.worker_pids()
    victim, age = _oldest(before, min_age)
    os.kill(victim, signal.SIGKILL)
    t0 = time.perf_counter()
    probes, serving, new_pid = 0, None, None
    deadline = time.monotonic() + 30
    while serving is None and time.monotonic() < deadline:
        probes += 1
        with contextlib.suppress(OSError, ValueError, KeyError, http.client.HTTPException):
            pid = get_pid(server.port, timeout=10)
            if pid not in before:
                serving, new_pid = time.perf_counter() - t0, pid
                break
        time.sleep(0.002)
    assert server.proc is not None
    OWNED.remember_children(server.proc)
    return {"victim": victim, "victim_age_s": round(age, 1), "serving": serving, "new_pid": new_pid,
            "probes": probes}  # fmt: skip


def timed_reload(server: Server) -> float:
    """(m) One reload of an idle server, in seconds, as an operator would see it end.

    ours: `python -m runtime reload --db <db>` as a subprocess, start to exit (it returns
    when the rolling restart is done). Peers: SIGHUP to the master, until every worker pid
    is new and a request on a fresh connection is answered by a new pid (10 ms polls).
    """
    assert server.proc is not None
    if isinstance(server, Ours):
        t0 = time.perf_counter()
        result = subprocess.run(
            [server.python, "-m", "runtime", "reload", "--db", str(server.db)],
            cwd=server.workdir, env=server.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        took = time.perf_counter() - t0
        if result.returncode != 0:
            raise RuntimeError(f"reload exited {result.returncode}: {result.stderr.strip()}")
    else:
        old = server.worker_pids()

        def done() -> bool:
            pids = server.worker_pids()
            return len(pids) == server.workers and not (pids & old) and get_pid(server.port) not in old

        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGHUP)
        wait_for(done, 90, f"{server.name}: a new set of {server.workers} workers serving", interval=0.01)
        took = time.perf_counter() - t0
    OWNED.remember_children(server.proc)
    return took


# ---------------------------------------------------------------- restarts phase (j, m)


def phase_restarts(python: str, workdir: Path, names: list[str], kills: int, reloads: int) -> dict[str, Any]:
    """j and m, each cell on a fresh server, all of them started side by side, then rounds.

    j's cells are KILL_CELLS; m's are ours, gunicorn and uvicorn at 4 workers (ours with
    `[server] health_path = "/"`: each new worker is asked for `/` over its private socket
    before it accepts). Round r kills one worker of every j server (r < `kills`) and
    reloads every m server once (r < `reloads`), all in a shuffled order. Ours waits for a
    victim VICTIM_AGE s old, so a round takes about that long (at 1 worker the victim is
    the last round's replacement): the other steps fill that wait. The servers not being
    measured are idle and cost next to nothing.
    """
    servers: dict[str, Server] = {}
    for name, workers in KILL_CELLS:
        if name in names:
            rundir = workdir / f"kill-{name}-{workers}"
            rundir.mkdir()
            servers[f"{name}-{workers}"] = SERVER_CLASSES[name](python, rundir, workers)
    for name in names:
        rundir = workdir / f"reload-idle-{name}"
        rundir.mkdir()
        if name == "ours":
            servers[f"reload-{name}"] = Ours(python, rundir, WORKERS, health_path=RELOAD_HEALTH_PATH)
        else:
            servers[f"reload-{name}"] = SERVER_CLASSES[name](python, rundir, WORKERS)
    samples: dict[str, list[dict[str, Any]]] = {key: [] for key in servers if not key.startswith("reload-")}
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = max(kills, reloads)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(servers))) as pool:
            for future in [pool.submit(server.start) for server in servers.values()]:
                future.result()
        for rnd in range(rounds):
            steps = [key for key in samples if rnd < kills] + [f"reload-{n}" for n in names if rnd < reloads]
            random.Random(rnd).shuffle(steps)
            for key in steps:
                server = servers[key]
                if key.startswith("reload-"):
                    wait_for(server.is_up, 60, f"{server.name} back to {server.workers} workers")
                    time.sleep(0.5)  # pacing: the old generation gone
                    took = timed_reload(server)
                    times[server.name].append(took)
                    print(f"[restarts {rnd + 1}/{rounds}] {server.name:10} m. reload of {WORKERS} idle workers: "
                          f"{took:.2f} s", flush=True)  # fmt: skip
                    continue
                sample = kill_to_serving(server, VICTIM_AGE if isinstance(server, Ours) else 0.0)
                samples[key].append(sample)
                print(f"[restarts {rnd + 1}/{rounds}] {key:10} j. kill -9 {sample['victim']} (age "
                      f"{sample['victim_age_s']} s) → a fresh connection served by {sample['new_pid']} after "
                      f"{fmt(sample['serving'] and 1000 * sample['serving'], ' ms', 1)} ({sample['probes']} probes)",
                      flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    return {"kill": samples, "reload_idle": times}


# ---------------------------------------------------------------- throughput phase (d, e, f; c at 2 workers)


def _tree_cpu(pid: int) -> tuple[float, float]:
    """User + system seconds of a live process and its live descendants, and of the process alone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    total = alone = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
            if proc is root:
                alone = times.user + times.system
    return total, alone


class CpuShare:
    """How much of the machine processes that are not ours used during a window (the noise in a run).

    The machine's user + nice + system time (/proc/stat) minus what the server's
    process tree, the wrk run (reaped: counted in RUSAGE_CHILDREN) and this script
    used. Interrupt time (softirq: loopback traffic) is left out on both sides.
    Also the hypervisor's steal time. Both as % of the whole machine (all cores).
    """

    def __init__(self, server: Server) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, Any, float, float, float, float]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = psutil.Process().cpu_times()
        tree, root = _tree_cpu(self.pid)
        return time.monotonic(), psutil.cpu_times(), tree, root, kids.ru_utime + kids.ru_stime, me.user + me.system

    def stop(self) -> dict[str, float]:
        t1, sys1, server1, root1, kids1, me1 = self._sample()
        t0, sys0, server0, root0, kids0, me0 = self.start
        capacity = max(1e-6, (t1 - t0) * (os.cpu_count() or 1))
        busy = (sys1.user - sys0.user) + (sys1.nice - sys0.nice) + (sys1.system - sys0.system)
        ours = (server1 - server0) + (kids1 - kids0) + (me1 - me0)
        steal = getattr(sys1, "steal", 0.0) - getattr(sys0, "steal", 0.0)
        return {
            "others_pct": round(100 * max(0.0, busy - ours) / capacity, 1),
            "steal_pct": round(100 * steal / capacity, 1),
            "server_cpu_s": round(server1 - server0, 4),
            "root_cpu_s": round(root1 - root0, 4),  # the primary / master / supervisor process alone
        }


def _own_cpu() -> float:
    """CPU seconds used so far by this script, its reaped children, and every live process it started (trees)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = psutil.Process().cpu_times()
    with OWNED.lock:
        roots = [proc.pid for proc in OWNED.procs if proc.poll() is None]
    return kids.ru_utime + kids.ru_stime + me.user + me.system + sum(_tree_cpu(pid)[0] for pid in roots)


def _busy() -> float:
    """The machine's user + nice + system CPU seconds so far (all cores; interrupts left out, as in CpuShare)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system


def wait_idle(limit: float = IDLE_WAIT) -> dict[str, float]:
    """Before a cell: wait until processes not started here used < IDLE_PCT of the machine over the last second.

    Samples one second at a time, for at most `limit` seconds. Returns how long it waited
    beyond the first second, and what others used in the last second sampled (which is
    above IDLE_PCT only if the limit ran out).
    """
    capacity = os.cpu_count() or 1
    started = last = time.monotonic()
    busy, own = _busy(), _own_cpu()
    while True:
        time.sleep(1.0)
        now, busy1, own1 = time.monotonic(), _busy(), _own_cpu()
        others = round(100 * max(0.0, (busy1 - busy) - (own1 - own)) / (capacity * (now - last)), 1)
        if others < IDLE_PCT or now - started >= limit:
            return {"idle_waited_s": round(now - started - 1.0, 1), "idle_others_pct": others}
        last, busy, own = now, busy1, own1


def throughput_plan(names: list[str]) -> dict[str, tuple[type[Server], int, str]]:
    """The servers of the throughput phase, by key: (class, workers, app).

    ours/gunicorn/uvicorn at 2 workers and ours at 1, all on plain_app; one plain uvicorn
    process on plain_app (e), and on the demo app bare and inside our middleware (f).
    """
    plan: dict[str, tuple[type[Server], int, str]] = {n: (SERVER_CLASSES[n], TPUT_WORKERS, APP) for n in names}
    if "ours" in names:
        plan["ours-1"] = (Ours, 1, APP)
    if "uvicorn" in names:
        plan["uvicorn-single"] = (UvicornSingle, 1, APP)
        plan["uvicorn-single-demo"] = (UvicornSingle, 1, DEMO_APP)
        plan["uvicorn-single-metrics"] = (UvicornSingle, 1, METRICS_APP)
    return plan


def phase_throughput(
    python: str, workdir: Path, names: list[str], rounds: int, seconds: float, balance_runs: int,
    balance_seconds: float, retries: int,
) -> dict[str, Any]:  # fmt: skip
    """d, e, f and c at 2 workers: rounds of cells, each cell on a fresh server.

    A cell is one server and one path. Each round runs every cell once, in a shuffled
    order: start the server, wait for an idle machine (wait_idle), warm up for 1 s on the
    cell's path, measure, stop the server; no cell inherits another's state. A run during
    which other processes used more than DISTURBED_PCT of the machine is run again right
    away on the same server (at most twice, and at most `retries` times in the phase); the
    least disturbed attempt is kept. In the first `balance_runs` rounds, a 2-worker `/`
    cell's server also gives one balance run (c) after its measurement.
    """
    micro = middleware_micro(python, workdir) if "uvicorn" in names else None
    plan = throughput_plan(names)
    cells = [(key, path) for key in names for path in TPUT_PATHS]
    cells += [(key, "/") for key in plan if key not in names]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {key: {p: [] for p in TPUT_PATHS} for key in plan}
    balance: dict[str, list[dict[str, Any]]] = {key: [] for key in names}
    attempts_all: list[dict[str, Any]] = []
    for rnd in range(rounds):
        order = list(cells)
        random.Random(rnd).shuffle(order)  # no server always runs right after the same one
        for key, path in order:
            cls, workers, app = plan[key]
            rundir = workdir / f"tput-{key}-{path.strip('/') or 'root'}-{rnd + 1}"
            rundir.mkdir()
            server = cls(python, rundir, workers, app)
            server.start(settle=0.0)  # wait_idle waits at least a second
            try:
                idle = wait_idle()
                Wrk(server.port, 1, path=path).finish()  # warm-up: connections, allocator, caches
                kept: dict[str, Any] | None = None
                for attempt in range(3):
                    run = _throughput_run(server, path, seconds, rnd)
                    run["attempt"] = attempt + 1
                    run.update(idle)
                    attempts_all.append(run)
                    print(f"[tput {rnd + 1}/{rounds}] {key:22} {path:5} {run['rps']:8.0f} req/s"
                          + (f", {run['failed']} failed" if run["failed"] else "")
                          + (f", p99 {run['p99_ms']:.1f} ms" if path == "/slow" and run["p99_ms"] else "")
                          + f", {fmt(run['cpu_us'], ' µs', 1)} server CPU a request"
                          + f"  (other processes: {run['others_pct']}% of the machine; idle check "
                          + f"{idle['idle_others_pct']}% after {idle['idle_waited_s']} s)", flush=True)  # fmt: skip
                    if kept is None or run["others_pct"] < kept["others_pct"]:
                        kept = run
                    if run["others_pct"] <= DISTURBED_PCT or retries <= 0 or attempt == 2:
                        break
                    retries -= 1
                    print(f"[tput {rnd + 1}/{rounds}] {'':22} disturbed: once more", flush=True)
                assert kept is not None
                runs[key][path].append(kept)
                if rnd < balance_runs and key in names and path == "/":
                    report = scenario_balance(server, balance_seconds, rundir / "wrk-balance.txt")
                    balance[key].append(report)
                    print(f"[tput {rnd + 1}/{rounds}] {key:22} c. balance at {TPUT_WORKERS} workers max/min "
                          f"{fmt(report['ratio'])} counts {report['counts']}", flush=True)  # fmt: skip
            finally:
                server.stop()
    return {"runs": runs, "balance": balance, "rounds": rounds, "seconds": seconds, "attempts": attempts_all,
            "micro": micro}  # fmt: skip


def _throughput_run(server: Server, path: str, seconds: float, rnd: int) -> dict[str, Any]:
    cpu = CpuShare(server)
    name = path.strip("/") or "root"
    out = server.workdir / f"wrk-{name}-{rnd + 1}-{time.monotonic_ns()}.txt"
    result = Wrk(server.port, seconds, path=path, out=out).finish()
    run = {"round": rnd + 1, "rps": result.rps, "requests": result.requests, "failed": result.failed,
           "p99_ms": result.p99_ms, **cpu.stop()}  # fmt: skip
    # CPU the server's whole process tree (ours: the primary too) spent per request: moved far less than
    # requests/s by other processes taking turns on the cores.
    run["cpu_us"] = round(1e6 * run["server_cpu_s"] / result.requests, 2) if result.requests else None
    run["root_cpu_us"] = round(1e6 * run["root_cpu_s"] / result.requests, 3) if result.requests else None
    return run


MICRO_RE = re.compile(r"bare ([\d.]+) µs, with MetricsMiddleware ([\d.]+) µs, added (-?[\d.]+) µs")


def middleware_micro(python: str, workdir: Path) -> dict[str, float] | None:
    """tests/bench/middleware_micro.py: the middleware's added µs per call, in-process, no server."""
    text, _, error = run_script(python, workdir, "middleware_micro.py", [], 120)
    print(f"[tput] {text.strip()}" + (f" ERROR: {error}" if error else ""), flush=True)
    if m := MICRO_RE.search(text):
        return {"bare_us": float(m.group(1)), "wrapped_us": float(m.group(2)), "added_us": float(m.group(3))}
    return None


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _paired(
    runs: dict[str, dict[str, list[dict[str, Any]]]], a: str, b: str, path: str, field: str = "rps"
) -> dict[str, float] | None:
    """a's `field` over b's, taken within each round (runs close in time), then median and min-max."""
    if a not in runs or b not in runs:
        return None
    by_round = {r["round"]: r[field] for r in runs[b][path]}
    ratios = [r[field] / by_round[r["round"]] for r in runs[a][path] if r[field] and by_round.get(r["round"])]
    return _spread(ratios)


def summarize_throughput(data: dict[str, Any]) -> dict[str, Any]:
    runs = data["runs"]
    summary: dict[str, Any] = {"rps": {}, "cpu_us": {}, "root_cpu_us": {}, "p99_ms": {}, "ratio": {}, "failed": {}}
    for key, paths in runs.items():
        for path, samples in paths.items():
            if samples:
                summary["rps"][f"{key} {path}"] = _spread([r["rps"] for r in samples])
                summary["cpu_us"][f"{key} {path}"] = _spread([r["cpu_us"] for r in samples if r["cpu_us"]])
                summary["root_cpu_us"][f"{key} {path}"] = _spread(
                    [r["root_cpu_us"] for r in samples if r["root_cpu_us"] is not None]
                )
                summary["p99_ms"][f"{key} {path}"] = _spread([r["p99_ms"] for r in samples if r["p99_ms"]])
                summary["failed"][f"{key} {path}"] = sum(r["failed"] for r in samples)
    for path in TPUT_PATHS:
        for peer in ("gunicorn", "uvicorn"):
            summary["ratio"][f"ours/{peer} {path}"] = _paired(runs, "ours", peer, path)
            summary["ratio"][f"cpu ours/{peer} {path}"] = _paired(runs, "ours", peer, path, "cpu_us")
            summary["ratio"][f"p99 ours/{peer} {path}"] = _paired(runs, "ours", peer, path, "p99_ms")
    summary["ratio"]["ours-1/uvicorn-single /"] = _paired(runs, "ours-1", "uvicorn-single", "/")
    summary["ratio"]["cpu ours-1/uvicorn-single /"] = _paired(runs, "ours-1", "uvicorn-single", "/", "cpu_us")
    summary["ratio"]["metrics/bare /"] = _paired(runs, "uvicorn-single-metrics", "uvicorn-single-demo", "/")
    summary["ratio"]["cpu metrics/bare /"] = _paired(
        runs, "uvicorn-single-metrics", "uvicorn-single-demo", "/", "cpu_us"
    )
    every = [r for paths in runs.values() for samples in paths.values() for r in samples]
    summary["idle_waited_s"] = _spread([r["idle_waited_s"] for r in every])
    summary["idle_others_pct"] = _spread([r["idle_others_pct"] for r in every])
    summary["idle_timed_out"] = sum(1 for r in every if r["idle_others_pct"] >= IDLE_PCT)
    summary["others_pct"] = _spread([r["others_pct"] for r in every])
    summary["others_pct_all_attempts"] = _spread([r["others_pct"] for r in data["attempts"]])
    summary["steal_pct"] = _spread([r["steal_pct"] for r in every])
    summary["runs_kept"] = len(every)
    summary["reruns"] = len(data["attempts"]) - len(every)
    summary["disturbed_kept"] = sum(1 for r in every if r["others_pct"] > DISTURBED_PCT)
    summary["micro"] = data.get("micro")
    summary["balance"] = {key: _balance_summary(reports) for key, reports in data["balance"].items()}
    return summary


def _balance_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        # median_low: with an even number of runs the figure is still one run's ratio
        "ratio": _median_low([b["ratio"] for b in reports if b["ratio"] is not None]),
        "starved_runs": sum(1 for b in reports if b["counts"] and min(b["counts"]) == 0),
        "ratio_runs": [b["ratio"] for b in reports],
        "counts": [b["counts"] for b in reports],
        "rps": median([b["rps"] for b in reports]),
    }


# ---------------------------------------------------------------- scripts phase (g, h, i)

SCHED_RE = re.compile(
    r"^(claimed \(started_at\)|job process running)\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms\s+max\s+([\d.]+) ms", re.M
)
SLOTS_RE = re.compile(r"slots run: (\d+) over (\d+)s")
EMIT_RE = re.compile(r"emit\(\): ([\d.]+) µs per call")
DELIVERY_RE = re.compile(r"delivery: (\d+) of (\d+) in ([\d.]+)s = (\d+) deliveries/s \(concurrency (\d+)")
CONSOLE_RE = re.compile(
    r"^(headless|console)\s+primary CPU\s+([\d.]+)% of one core, RSS (\d+) MiB \((\d+) idle workers\)", re.M
)


def run_script(python: str, workdir: Path, script: str, args: list[str], timeout: float) -> tuple[str, float, str]:
    """Run one of the other bench scripts as a child; (its output, seconds, error or "")."""
    env = {**os.environ, "BENCH_OWNER": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    started = time.monotonic()
    proc = OWNED.popen([python, str(HERE / script), *args], cwd=workdir, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip

    def note_descendants() -> None:  # so that a Ctrl+C here can end what the script started, by pid
        while proc.poll() is None:
            OWNED.remember_children(proc)
            time.sleep(0.5)

    threading.Thread(target=note_descendants, daemon=True).start()
    error = ""
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:g} s"
        proc.send_signal(signal.SIGTERM)  # the scripts stop what they started on SIGTERM
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
    finally:
        OWNED.stop(proc, graceful=30)
    text = stdout.decode(errors="replace")
    if not error and proc.returncode != 0:
        error = f"exited {proc.returncode}"
    return text, time.monotonic() - started, error


def phase_scripts(python: str, workdir: Path, quick: bool) -> dict[str, Any]:
    sched_seconds = 20 if quick else 60
    console_seconds = 5 if quick else 10
    plan = [
        ("scheduler_lateness.py", ["--seconds", str(sched_seconds)], sched_seconds + 90),
        ("webhooks.py", [], 360),
        ("console_cost.py", ["--seconds", str(console_seconds)], 2 * console_seconds + 150),
    ]
    results: dict[str, Any] = {}
    for script, args, timeout in plan:
        print(f"[scripts] {script} {' '.join(args)} ...", flush=True)
        text, took, error = run_script(python, workdir, script, args, timeout)
        for line in text.strip().splitlines():
            print(f"[scripts]   {line}", flush=True)
        if error:
            print(f"[scripts]   ERROR: {error}", flush=True)
        results[script] = {"args": args, "output": text, "seconds": round(took, 1), "error": error}
    return results


def parse_scripts(results: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    text = results.get("scheduler_lateness.py", {}).get("output", "")
    for label, p50, p99, top in SCHED_RE.findall(text):
        key = "sched_claim" if label.startswith("claimed") else "sched_exec"
        parsed[key] = (float(p50), float(p99), float(top))
    if m := SLOTS_RE.search(text):
        parsed["sched_slots"], parsed["sched_seconds"] = int(m.group(1)), int(m.group(2))
    text = results.get("webhooks.py", {}).get("output", "")
    if m := EMIT_RE.search(text):
        parsed["emit_us"] = float(m.group(1))
    if m := DELIVERY_RE.search(text):
        parsed["deliveries"] = {"delivered": int(m.group(1)), "events": int(m.group(2)), "seconds": float(m.group(3)),
                                "per_s": int(m.group(4)), "concurrency": int(m.group(5))}  # fmt: skip
    text = results.get("console_cost.py", {}).get("output", "")
    for mode, cpu, rss, workers in CONSOLE_RE.findall(text):
        parsed[f"primary_{mode}"] = {"cpu_pct": float(cpu), "rss_mib": int(rss), "workers": int(workers)}
    if "console: skipped" in text:
        parsed["primary_console_skipped"] = True
    return parsed


# ---------------------------------------------------------------- environment


def ensure_env(python: str | None) -> str:
    if python:
        missing = _missing_modules(python)
        if missing:
            sys.exit(f"run.py: {python} lacks {', '.join(missing)}; install the project plus gunicorn uvicorn-worker")
        return python
    bench_python = BENCH_VENV / "bin" / "python"
    if bench_python.exists() and not _missing_modules(str(bench_python)):
        return str(bench_python)
    print(f"creating the bench venv at {BENCH_VENV} ...", file=sys.stderr, flush=True)
    base = _base_python()
    subprocess.run([base, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run(
        [str(bench_python), "-m", "pip", "install", "-q", "-e", str(REPO), "gunicorn", "uvicorn-worker", "psutil",
         "httpx"],
        check=True,
    )  # fmt: skip
    missing = _missing_modules(str(bench_python))
    if missing:
        sys.exit(f"run.py: the bench venv still lacks {', '.join(missing)}")
    return str(bench_python)


def _base_python() -> str:
    """A Python that is not inside a venv, if we can tell (so the bench venv does not chain venvs)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.path.exists(base) else sys.executable


def _missing_modules(python: str) -> list[str]:
    code = (
        "import importlib.util,sys;"
        f"print(' '.join(m for m in {list(NEEDED_IN_ENV)!r} if importlib.util.find_spec(m) is None))"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(a working Python)"]
    return out.split()


def env_versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, sys, json;"
        "names=['clusterctl-tui','gunicorn','uvicorn','uvicorn-worker','uvloop','httptools'];"
        "d={n: m.version(n) for n in names}; d['python']=sys.version.split()[0]; print(json.dumps(d))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def slow_ms(python: str) -> float | None:
    """What plain_app's `/slow` burns per request on this machine (its hashing alone), in ms."""
    code = (
        "import time; from plain_app import burn\n"
        "burn(); t = time.process_time()\n"
        "for _ in range(200): burn()\n"
        "print((time.process_time() - t) / 200 * 1000)"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    try:
        return float(out.stdout.strip())
    except ValueError:
        return None


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "wrk": wrk_version[0].strip() if wrk_version else "?",
        "loadavg": _loadavg(),
    }


def _loadavg() -> str:
    """1/5/15-minute load: anything else running on the machine shows here and skews the figures."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------- report


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if value == float("inf"):
        return "inf"
    return f"{value:.{digits}f}{unit}"


def summarize_restarts(data: dict[str, Any]) -> dict[str, Any]:
    """j: kill → serving per cell, ms (median and max); m: idle reload per server, s (median, min-max)."""
    kills = {}
    for key, samples in data["kill"].items():
        serving = [1000 * k["serving"] for k in samples if k["serving"] is not None]
        kills[key] = {**(_spread(serving) or {}), "never": len(samples) - len(serving)}
    return {"kill_ms": kills, "reload_s": {name: _spread(times) for name, times in data["reload_idle"].items()}}


def _memory_summary(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the reps of each rep's per-worker median (MiB); the fork server's USS for ours."""
    helpers = [h["uss"] for m in memory for h in m["helpers"]]
    return {
        "uss_mib": _spread([m["uss"] / MIB for m in memory if m["uss"] is not None]),
        "pss_mib": _spread([m["pss"] / MIB for m in memory if m["pss"] is not None]),
        "helper_uss_mib": _spread([u / MIB for u in helpers]),
    }


def _by_rep(a: list[dict[str, Any]], b: list[dict[str, Any]], field: str) -> dict[str, float] | None:
    """a's `field` over b's, rep by rep (the runs a few seconds apart), then median and min-max."""
    return _spread([x[field] / y[field] for x, y in zip(a, b, strict=False) if x[field] and y[field]])


def summarize(runs: dict[str, dict[str, list[Any]]], preload: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name, data in runs.items():
        reloads = data["reload"]
        kills = data["kill"]
        balance = data["balance"]
        up = [k["up"] for k in kills if k["up"] is not None]
        serving = [k["serving"] for k in kills if k["serving"] is not None]
        summary[name] = {
            "reload_failed": median([r["failed"] for r in reloads]),
            "reload_failed_runs": [r["failed"] for r in reloads],
            "reload_breakdown": [
                {k: r[k] for k in ("connect", "read", "write", "timeout", "non2xx", "requests")} for r in reloads
            ],
            "reload_seconds": median([d for r in reloads for d in r["reload_s"]]),
            "reload_rps": median([r["rps"] for r in reloads]),
            "kill_up_ms": None if not up else 1000 * median(up),
            "kill_serving_ms": None if not serving else 1000 * median(serving),
            "kill_samples": len(kills),
            "kill_missing_serving": len(kills) - len(serving),
            "kill_young_up_ms": _ms([k["up"] for k in data["kill_young"]]),
            "kill_young_serving_ms": _ms([k["serving"] for k in data["kill_young"]]),
            "kill_young_samples": len(data["kill_young"]),
            # median_low: with an even number of runs the figure is still one run's ratio
            "balance_ratio": _median_low([b["ratio"] for b in balance if b["ratio"] is not None]),
            "balance_starved_runs": sum(1 for b in balance if b["counts"] and min(b["counts"]) == 0),
            "balance_ratio_runs": [b["ratio"] for b in balance],
            "balance_counts": [b["counts"] for b in balance],
            "balance_rps": median([b["rps"] for b in balance]),
            "newconn_rps": _spread([n["rps"] for n in data["newconn"]]),
            "newconn_failed": sum(n["failed"] for n in data["newconn"]),
            "newconn_cpu_us": _spread([n["cpu_us"] for n in data["newconn"] if n["cpu_us"]]),
            "newconn_ours_ratio": _by_rep(runs["ours"]["newconn"], data["newconn"], "rps") if "ours" in runs else None,
            **_memory_summary(data["memory"]),
        }
    if "ours" in summary:
        summary["ours"]["preload"] = {
            **_memory_summary(preload["memory"]),
            "newconn_rps": _spread([n["rps"] for n in preload["newconn"]]),
        }
    return summary


def _ms(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return 1000 * statistics.median(found) if found else None


def _range(spread: dict[str, float] | None, render: Any, transform: Any = None) -> str:
    """median (min–max) of a spread, each value rendered by `render`; just the value for a single run.

    `transform` maps the values first (min and max re-ordered if it reverses them).
    """
    if spread is None:
        return "n/a"
    if transform is not None:
        low, high = sorted((transform(spread["min"]), transform(spread["max"])))
        spread = {**spread, "median": transform(spread["median"]), "min": low, "max": high}
    if spread["n"] == 1:
        return render(spread["median"])
    return f"{render(spread['median'])} ({render(spread['min'])}–{render(spread['max'])})"


def _rps(value: float) -> str:
    return f"{value:.0f}"


def _x(value: float) -> str:
    return f"{value:.2f}"


def _pct(value: float) -> str:
    """A share as a signed percentage."""
    return f"{100 * value:+.1f}%"


def _less(ratio: float) -> float:
    """A with÷without requests/s ratio as the share of throughput lost (negative: gained)."""
    return 1 - ratio


def _more(ratio: float) -> float:
    """A with÷without CPU-per-request ratio as the extra CPU spent (negative: less)."""
    return ratio - 1


def _us2(value: float) -> str:
    return f"{value:.2f}"


def _d1(value: float) -> str:
    return f"{value:.1f}"


def _secs(value: float) -> str:
    return f"{value:.1f} s"


def _us(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


TABLE_ORDER = "jmdefklabcghi"  # the figures first, then the others; rows of one letter in the order added


def table(
    names: list[str], cluster: dict[str, dict[str, Any]] | None, tput: dict[str, Any] | None,
    scripts: dict[str, Any] | None, restarts: dict[str, Any] | None, info: dict[str, Any],
) -> str:  # fmt: skip
    """The one table: a row per figure, a column per server (figures of ours alone go in the `ours` column)."""
    columns = list(names) or ["ours"]
    rows: list[tuple[str, dict[str, str]]] = []

    def add(label: str, cells: dict[str, str]) -> None:
        rows.append((label, cells))

    if restarts:
        kill_ms = restarts["kill_ms"]

        def median_max(spread: dict[str, Any] | None) -> str:
            if not spread or "median" not in spread:
                return "n/a"
            never = f", {spread['never']} never" if spread["never"] else ""
            return f"{spread['median']:.0f} (max {spread['max']:.0f}, n {spread['n']}{never})"

        for workers in (2, 1):
            add(f"j. kill -9 → a fresh connection served by its replacement, {workers} worker"
                + ("s" if workers > 1 else "") + ", ms: median (max)",
                {n: median_max(kill_ms.get(f"{n}-{workers}")) for n in names if f"{n}-{workers}" in kill_ms})  # fmt: skip
        add(f"m. reload of {WORKERS} idle workers, s: median (min–max). ours: `python -m runtime reload` end to end,"
            f" health_path = \"{RELOAD_HEALTH_PATH}\"; peers: SIGHUP until all pids new and a new pid serves",
            {n: _range(restarts["reload_s"].get(n), _x) for n in names})  # fmt: skip

    if cluster:
        add(f"k. new connection per request (`wrk -t2 -c64 -H \"Connection: close\"` on `/`), {WORKERS} workers,"
            " req/s: median (min–max over reps)",
            {n: _range(cluster[n]["newconn_rps"], _rps)
             + (f" ({cluster[n]['newconn_failed']} failed)" if cluster[n]["newconn_failed"] else "")
             for n in cluster})  # fmt: skip
        add("k. ours ÷ this peer, new connection per request (same rep)",
            {n: _range(cluster[n]["newconn_ours_ratio"], _x) for n in cluster if n != "ours"})  # fmt: skip
        add("k. server CPU per request on new connections, µs (all its processes)",
            {n: _range(cluster[n]["newconn_cpu_us"], _us) for n in cluster})  # fmt: skip
        add(f"l. private memory per worker, USS, MiB ({WORKERS} workers after k's load; median worker, "
            "median over reps)", {n: _range(cluster[n]["uss_mib"], _d1) for n in cluster})  # fmt: skip
        add(f"l. proportional memory per worker, PSS, MiB ({WORKERS} workers, as above)",
            {n: _range(cluster[n]["pss_mib"], _d1) for n in cluster})  # fmt: skip
        if "ours" in cluster:
            pre = cluster["ours"]["preload"]
            add("l. the same with `[server] preload_app = true`: USS / PSS per worker, MiB",
                {"ours": f"{_range(pre['uss_mib'], _d1)} / {_range(pre['pss_mib'], _d1)}"})  # fmt: skip
            add("l. our fork server's USS, MiB: without / with preload_app",
                {"ours": f"{_range(cluster['ours']['helper_uss_mib'], _d1)} / "
                         f"{_range(pre['helper_uss_mib'], _d1)}"})  # fmt: skip
        per = [
            ("a. failed requests over 3 rolling restarts (wrk -c64)", lambda s: fmt(s["reload_failed"], digits=0)),
            ("a. failed requests, each run", lambda s: " / ".join(str(x) for x in s["reload_failed_runs"])),
            (f"a. one rolling restart of {WORKERS} workers, s", lambda s: fmt(s["reload_seconds"], digits=1)),
            ("b. kill -9 → replacement up, ms", lambda s: fmt(s["kill_up_ms"], digits=0)),
            (
                "b. kill -9 → replacement serving, ms",
                lambda s: (
                    fmt(s["kill_serving_ms"], digits=0)
                    + (f" ({s['kill_missing_serving']} never)" if s["kill_missing_serving"] else "")
                ),
            ),  # fmt: skip
            (
                "b. same, victim killed just after the reloads (< 10 s old): up, ms",
                lambda s: fmt(s["kill_young_up_ms"], digits=0),
            ),
            (
                "b. same, victim killed just after the reloads: serving, ms",
                lambda s: fmt(s["kill_young_serving_ms"], digits=0),
            ),
            (f"c. balance max/min, {WORKERS} workers (median run)", lambda s: fmt(s["balance_ratio"])),
            (f"c. balance max/min, {WORKERS} workers, each run",
             lambda s: " / ".join(fmt(r) for r in s["balance_ratio_runs"])),
            (f"c. runs in which a worker got no request at all, {WORKERS} workers",
             lambda s: f"{s['balance_starved_runs']} of {len(s['balance_ratio_runs'])}"),
            (f"c. requests per worker, {WORKERS} workers (median run)",
             lambda s: _median_counts(s["balance_ratio_runs"], s["balance_counts"])),
            (f"c. req/s during the {WORKERS}-worker balance runs (context only, noisy)",
             lambda s: fmt(s["balance_rps"], digits=0)),
        ]  # fmt: skip
        for label, cell in per:
            add(label, {n: cell(cluster[n]) for n in cluster})

    if tput:
        bal = tput["balance"]
        w = TPUT_WORKERS
        add(f"c. balance max/min, {w} workers (median run)", {n: fmt(b["ratio"]) for n, b in bal.items()})
        add(f"c. balance max/min, {w} workers, each run",
            {n: " / ".join(fmt(r) for r in b["ratio_runs"]) for n, b in bal.items()})  # fmt: skip
        add(f"c. runs in which a worker got no request at all, {w} workers",
            {n: f"{b['starved_runs']} of {len(b['ratio_runs'])}" for n, b in bal.items()})  # fmt: skip
        add(f"c. requests per worker, {w} workers (median run)",
            {n: _median_counts(b["ratio_runs"], b["counts"]) for n, b in bal.items()})  # fmt: skip
        rps, ratio, cpu = tput["rps"], tput["ratio"], tput["cpu_us"]
        slow = info.get("slow_ms")
        for path, what in (("/", "trivial"), ("/slow", f"fixed hashing, {slow:.2f} ms CPU here" if slow else "CPU")):
            add(f"d. req/s on `{path}` ({what}), keep-alive, {w} workers, wrk -t2 -c64: median (min–max)",
                {n: _range(rps.get(f"{n} {path}"), _rps) for n in names})  # fmt: skip
            add(f"d. ours ÷ this peer, req/s on `{path}`, {w} workers (same round): median (min–max)",
                {n: _range(ratio.get(f"ours/{n} {path}"), _x) for n in ("gunicorn", "uvicorn") if n in names})  # fmt: skip
            if path == "/slow":
                add(f"d. p99 latency on `{path}`, {w} workers (wrk --latency), ms: median (min–max)",
                    {n: _range(tput["p99_ms"].get(f"{n} {path}"), _d1) for n in names})  # fmt: skip
                add(f"d. ours ÷ this peer, p99 on `{path}` (same round; < 1: ours answers sooner)",
                    {n: _range(ratio.get(f"p99 ours/{n} {path}"), _x) for n in ("gunicorn", "uvicorn")
                     if n in names})  # fmt: skip
            add(f"d. server CPU per request on `{path}`, µs (all its processes)",
                {n: _range(cpu.get(f"{n} {path}"), _us) for n in names})  # fmt: skip
            if path == "/":
                add("d. of that, the primary's / master's / supervisor's own process, µs",
                    {n: _range(tput["root_cpu_us"].get(f"{n} {path}"), _us2) for n in names})  # fmt: skip
            add(f"d. ours ÷ this peer, CPU per request on `{path}` (same round; < 1: ours spends less)",
                {n: _range(ratio.get(f"cpu ours/{n} {path}"), _x) for n in ("gunicorn", "uvicorn") if n in names})  # fmt: skip
        add("e. req/s on `/`, 1 worker: ours `--workers 1` / one plain `uvicorn` process",
            {"ours": _range(rps.get("ours-1 /"), _rps), "uvicorn": _range(rps.get("uvicorn-single /"), _rps)})  # fmt: skip
        add("e. ours ÷ plain uvicorn, req/s, 1 worker (same round)",
            {"uvicorn": _range(ratio.get("ours-1/uvicorn-single /"), _x)})  # fmt: skip
        add("e. server CPU per request on `/`, µs, 1 worker (ours: worker + primary)",
            {"ours": _range(cpu.get("ours-1 /"), _us), "uvicorn": _range(cpu.get("uvicorn-single /"), _us)})  # fmt: skip
        add("e. of that, our primary's own process, µs",
            {"ours": _range(tput["root_cpu_us"].get("ours-1 /"), _us2)})  # fmt: skip
        add("e. ours ÷ plain uvicorn, CPU per request, 1 worker (same round)",
            {"uvicorn": _range(ratio.get("cpu ours-1/uvicorn-single /"), _x)})  # fmt: skip
        add("f. one plain uvicorn process serving the demo app: req/s on `/`, bare / inside `MetricsMiddleware`",
            {"ours": f"{_range(rps.get('uvicorn-single-demo /'), _rps)} / "
                     f"{_range(rps.get('uvicorn-single-metrics /'), _rps)}"})  # fmt: skip
        add("f. metrics middleware cost in req/s: 1 − with ÷ without (same round)",
            {"ours": _range(ratio.get("metrics/bare /"), _pct, _less)})  # fmt: skip
        add("f. the same processes' CPU per request on `/`, µs: bare / with the middleware",
            {"ours": f"{_range(cpu.get('uvicorn-single-demo /'), _us)} / "
                     f"{_range(cpu.get('uvicorn-single-metrics /'), _us)}"})  # fmt: skip
        add("f. metrics middleware cost in CPU per request: with ÷ without − 1 (same round)",
            {"ours": _range(ratio.get("cpu metrics/bare /"), _pct, _more)})  # fmt: skip
        micro, bare_cpu = tput.get("micro"), cpu.get("uvicorn-single-demo /")
        add("f. the middleware alone, app called in-process (no server): µs added per request,"
            " and that as a share of the bare demo process's CPU per request",
            {"ours": f"{micro['added_us']:.2f} µs" + (f" = {100 * micro['added_us'] / bare_cpu['median']:.1f}%"
                                                      if bare_cpu else "") if micro else "n/a"})  # fmt: skip

    if scripts is not None:
        sched = scripts.get("sched_seconds", "?")
        for key, what in (("sched_claim", "slot claimed"), ("sched_exec", "job process running")):
            value = scripts.get(key)
            add(f"g. scheduler lateness, every-second job over {sched} s, {what}: p50 / p99 / max, ms",
                {"ours": " / ".join(f"{v:.1f}" for v in value) if value else "n/a"})  # fmt: skip
        add("h. emit() cost, µs per call", {"ours": fmt(scripts.get("emit_us"), digits=0)})
        d = scripts.get("deliveries")
        add("h. webhook deliveries/s to a local receiver"
            + (f" ({d['events']} queued, concurrency {d['concurrency']}, primary start included)" if d else ""),
            {"ours": f"{d['per_s']}" + ("" if d["delivered"] == d["events"] else f" ({d['delivered']} delivered)")
             if d else "n/a"})  # fmt: skip
        for mode, what in (("headless", "headless"), ("console", "console in tmux 100x30")):
            value = scripts.get(f"primary_{mode}")
            cell = f"{value['cpu_pct']:.2f}% / {value['rss_mib']} MiB" if value else "n/a"
            if mode == "console" and scripts.get("primary_console_skipped"):
                cell = "skipped (no tmux)"
            n_workers = value["workers"] if value else 8
            add(f"i. primary's own CPU (% of one core) / RSS, {n_workers} idle workers, {what}", {"ours": cell})

    rows.sort(key=lambda row: TABLE_ORDER.index(row[0][0]))  # stable: a letter's rows stay in order
    out = ["| figure | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for label, cells in rows:
        out.append(f"| {label} | " + " | ".join(cells.get(c, "–") for c in columns) + " |")
    return "\n".join(out)


def _median_counts(ratio_runs: list[float | None], counts: list[list[int]]) -> str:
    runs = [(r, c) for r, c in zip(ratio_runs, counts, strict=True) if r is not None]
    if not runs:
        return "n/a"
    runs.sort(key=lambda rc: rc[0])
    return " / ".join(str(n) for n in runs[(len(runs) - 1) // 2][1])  # the median_low run


def _median_low(values: list[float]) -> float | None:
    return statistics.median_low(values) if values else None


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (under 4 minutes, not 12)")
    parser.add_argument("--python", metavar="PATH", help="an env with the project, gunicorn and uvicorn-worker")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: ours,gunicorn,uvicorn")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of: " + ",".join(PHASES))
    parser.add_argument("--json", metavar="PATH", help="also write every raw figure to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and wrk outputs")
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("run.py: wrk is not installed; on Debian/Ubuntu: apt-get install wrk", file=sys.stderr)
        return 2
    python = ensure_env(args.python)
    if psutil is None:  # this interpreter lacks psutil: the bench env has it
        os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:], "--python", python])

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in SERVER_CLASSES]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}")
    servers = [s for s in SERVERS if s in servers]  # the columns always in the same order
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    quick = args.quick
    # throughput phase: rounds of interleaved cells, each on a fresh server
    tput_rounds = 1 if quick else 5
    tput_seconds = 2
    # restarts phase: kills per cell (j), idle reloads per server (m)
    restart_kills = 1 if quick else 5
    idle_reloads = 2 if quick else 5
    # cluster phase: reps of (new connections, memory, balance, kills, reloads) per server
    reps = 1 if quick else 3
    newconn_seconds = 3
    kills_total = 2 if quick else 5
    balance_seconds = 3  # the 64 connections are placed in the first milliseconds
    balance_runs = 1 if quick else 2  # placement varies a lot from one wrk start to the next
    balance2_runs = 1 if quick else 3  # at 2 workers, in the throughput phase: one per round
    tput_retries = 3 if quick else 10  # runs disturbed by other processes, run again (2 s each)

    info: dict[str, Any] = {
        "machine": machine(),
        "versions": env_versions(python),
        "mode": "quick" if quick else "full",
    }
    # What the machine is doing before we start anything: other people's jobs skew every figure.
    info["cpu_busy_before_pct"] = psutil.cpu_percent(interval=2.0)
    info["slow_ms"] = slow_ms(python)
    print(f"machine: {info['machine']}; CPU busy before we start: {info['cpu_busy_before_pct']}%", flush=True)
    print(f"versions: {info['versions']}; /slow hashes for {fmt(info['slow_ms'], ' ms')} a request here", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="clusterctl-bench-"))
    runs: dict[str, dict[str, list[Any]]] = {
        n: {"reload": [], "kill": [], "kill_young": [], "balance": [], "newconn": [], "memory": []} for n in servers
    }
    preload: dict[str, list[Any]] = {"newconn": [], "memory": []}  # ours with preload_app = true (l)
    tput_data: dict[str, Any] | None = None
    restarts: dict[str, Any] | None = None
    script_results: dict[str, Any] | None = None
    started = time.monotonic()
    took: dict[str, float] = {}
    try:
        if "throughput" in phases:
            t0 = time.monotonic()
            tput_data = phase_throughput(python, workdir, servers, tput_rounds, tput_seconds, balance2_runs,
                                         balance_seconds, tput_retries)  # fmt: skip
            took["throughput"] = time.monotonic() - t0
        if "restarts" in phases:
            t0 = time.monotonic()
            restarts = phase_restarts(python, workdir, servers, restart_kills, idle_reloads)
            took["restarts"] = time.monotonic() - t0
        if "cluster" in phases:
            t0 = time.monotonic()
            for rep in range(reps):
                kills = len(range(rep, kills_total, reps))
                for name in servers:
                    rundir = workdir / f"{name}-{rep + 1}"
                    rundir.mkdir()
                    server = SERVER_CLASSES[name](python, rundir)
                    server.start()
                    try:
                        run_cluster_rep(server, runs[name], rep, reps, kills, balance_runs, balance_seconds,
                                        newconn_seconds)  # fmt: skip
                    finally:
                        server.stop()
                if "ours" in servers:  # a 4th server, for l's preload figure alone
                    rundir = workdir / f"ours-preload-{rep + 1}"
                    rundir.mkdir()
                    server = Ours(python, rundir, WORKERS, preload=True)
                    server.start()
                    try:
                        newconn_and_memory(server, preload, rep, reps, newconn_seconds, "preload")
                    finally:
                        server.stop()
            took["cluster"] = time.monotonic() - t0
        if "scripts" in phases:
            t0 = time.monotonic()
            script_results = phase_scripts(python, workdir, quick)
            took["scripts"] = time.monotonic() - t0
        info["loadavg_after"] = _loadavg()
        info["seconds"] = {k: round(v) for k, v in took.items()}
        cluster = summarize(runs, preload) if "cluster" in phases else None
        restart_summary = summarize_restarts(restarts) if restarts is not None else None
        tput = summarize_throughput(tput_data) if tput_data else None
        scripts = parse_scripts(script_results) if script_results is not None else None
        print(f"\n{info['mode']} run, {time.monotonic() - started:.0f} s ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()) + f"); load average before "
              f"{info['machine']['loadavg']}, after {info['loadavg_after']}; CPU busy before we started: "
              f"{info['cpu_busy_before_pct']}%")  # fmt: skip
        if tput:
            pct = lambda v: f"{v:.0f}%"  # noqa: E731
            print(f"throughput: {tput_rounds} interleaved round(s) of {tput_seconds} s wrk runs. Other processes used "
                  f"{_range(tput['others_pct_all_attempts'], pct)} of the machine's CPU during a run; "
                  f"{tput['reruns']} disturbed run(s) (> {DISTURBED_PCT:.0f}%) were run again; in the "
                  f"{tput['runs_kept']} runs kept: {_range(tput['others_pct'], pct)}, "
                  f"{tput['disturbed_kept']} still above {DISTURBED_PCT:.0f}%; "
                  f"steal {_range(tput['steal_pct'], pct)}")  # fmt: skip
            print(f"idle check before each cell: waited {_range(tput['idle_waited_s'], _secs)} "
                  f"beyond its first second, others then at {_range(tput['idle_others_pct'], pct)}; "
                  f"{tput['idle_timed_out']} cell(s) started after {IDLE_WAIT:.0f} s without an idle second")  # fmt: skip
            failed = {k: v for k, v in tput["failed"].items() if v}
            if failed:
                print(f"throughput runs with failed requests (socket errors or non-2xx): {failed}")
        if cluster:
            print(f"cluster: {reps} interleaved rep(s) per server at {WORKERS} workers")
        print()
        print(table(servers, cluster, tput, scripts, restart_summary, info))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {**info, "summary": cluster, "runs": runs, "preload": preload,
                 "restarts": {"summary": restart_summary, "raw": restarts},
                 "throughput": {"summary": tput, "raw": tput_data},
                 "scripts": {"parsed": scripts, "raw": script_results}}, indent=2, default=str))  # fmt: skip
        return 0
    finally:
        OWNED.stop_all()
        if args.keep_logs:
            print(f"\nlogs and wrk outputs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_cluster_rep(
    server: Server, runs: dict[str, list[Any]], rep: int, reps: int, kills: int, balance_runs: int,
    balance_seconds: float, newconn_seconds: float,
) -> None:  # fmt: skip
    """One rep of the cluster phase on a fresh server: k (new connections) then l (memory), c (balance),
    b (kills), a (reloads), b (young victim)."""
    name = server.name
    rundir = server.workdir
    newconn_and_memory(server, runs, rep, reps, newconn_seconds, name)
    for b in range(balance_runs):
        balance = scenario_balance(server, balance_seconds, rundir / f"wrk-balance-{b + 1}.txt")
        runs["balance"].append(balance)
        print(f"[{rep + 1}/{reps}] {name:8} c. balance max/min {fmt(balance['ratio'])} "
              f"counts {balance['counts']} ({balance['rps']:.0f} req/s)", flush=True)  # fmt: skip
    samples = scenario_kill(server, kills, VICTIM_AGE if name == "ours" else 0.0)
    runs["kill"].extend(samples)
    for k in samples:
        print(f"[{rep + 1}/{reps}] {name:8} b. kill -9 {k['victim']} (age {k['victim_age_s']} s): "
              f"up {fmt(k['up'] and 1000 * k['up'], ' ms', 0)}, "
              f"serving {fmt(k['serving'] and 1000 * k['serving'], ' ms', 0)}", flush=True)  # fmt: skip
    reload = scenario_reload(server, 3, rundir / "wrk-reload.txt")
    runs["reload"].append(reload)
    print(f"[{rep + 1}/{reps}] {name:8} a. 3 reloads: {reload['failed']} failed "
          f"(connect {reload['connect']}, read {reload['read']}, write {reload['write']}, "
          f"timeout {reload['timeout']}, non-2xx {reload['non2xx']}) of {reload['requests']} "
          f"in {reload['window_s']} s; reloads took {reload['reload_s']} s"
          + (f"; ERROR {reload['error']}" if reload["error"] else ""), flush=True)  # fmt: skip
    young = scenario_kill(server, 1, 0.0)
    runs["kill_young"].extend(young)
    for k in young:
        print(f"[{rep + 1}/{reps}] {name:8} b. kill -9 {k['victim']} (age {k['victim_age_s']} s, "
              f"just after the reloads): up {fmt(k['up'] and 1000 * k['up'], ' ms', 0)}, "
              f"serving {fmt(k['serving'] and 1000 * k['serving'], ' ms', 0)}", flush=True)  # fmt: skip


def newconn_and_memory(
    server: Server, runs: dict[str, list[Any]], rep: int, reps: int, newconn_seconds: float, label: str
) -> None:
    """k and l on a fresh server: new connection per request, then memory right after that load."""
    newconn = scenario_newconn(server, newconn_seconds, server.workdir / "wrk-newconn.txt")
    runs["newconn"].append(newconn)
    print(f"[{rep + 1}/{reps}] {label:8} k. new connection per request: {newconn['rps']:.0f} req/s"
          + (f", {newconn['failed']} failed" if newconn["failed"] else "")
          + f", {fmt(newconn['cpu_us'], ' µs', 1)} server CPU a request (other processes: {newconn['others_pct']}%"
          + f" of the machine; idle check {newconn['idle_others_pct']}% after {newconn['idle_waited_s']} s)",
          flush=True)  # fmt: skip
    memory = server.memory()
    runs["memory"].append(memory)
    helpers = "".join(f", fork server USS {_mib(h['uss'])} MiB" for h in memory["helpers"])
    print(f"[{rep + 1}/{reps}] {label:8} l. per worker, median of {len(memory['workers'])}: "
          f"USS {_mib(memory['uss'])} MiB, PSS {_mib(memory['pss'])} MiB{helpers}", flush=True)  # fmt: skip


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.1f}"


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here has been stopped", file=sys.stderr)
        sys.exit(130)
