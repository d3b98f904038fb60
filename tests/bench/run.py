#!/usr/bin/env python3
"""Benchmark clusterctl-tui against gunicorn and uvicorn on the bundled demo app.

    python tests/bench/run.py [--quick] [--python PATH] [--json PATH] [--keep-logs]

Three scenarios, each run for every server ("ours", "gunicorn", "uvicorn") on
`runtime.demo:app`, at 4 workers, bound to 127.0.0.1:<free port>, with the same
uvicorn flavour (httptools + uvloop) and the same keep-alive timeout (5 s):

  a. rolling restart under keep-alive load: `wrk -t2 -c64` on `/` for the whole
     window, 3 consecutive reloads in it; failed requests = wrk socket errors
     (connect/read/write/timeout) + non-2xx/3xx responses.
  b. kill -9 of one worker: time until the replacement is up (ours: `status`
     shows the slot with a new pid in state "ready"; peers: psutil shows a new
     child of the master) and until the port answers a request served by it.
  c. balance: per-worker request counts under `wrk -t2 -c64` keep-alive load,
     max/min ratio.

Runs are interleaved (rep 1: ours, gunicorn, uvicorn; rep 2: ...) and medians
reported. Load and every probe go to 127.0.0.1 only. Every process this script
starts is ended by PID on exit, Ctrl+C or error.

Needs `wrk` (Debian: `apt-get install wrk`). The servers run in a bench venv
(tests/bench/.bench-venv, made on first use: the project editable, gunicorn,
uvicorn-worker) unless `--python` names an env that has them. This script
itself needs only the stdlib and psutil; if the Python running it lacks psutil
it re-runs itself with the bench venv's Python.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
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
APP = "runtime.demo:app"
HOST = "127.0.0.1"
WORKERS = 4
VICTIM_AGE = 13.0  # s since spawn: ready 10 s or more, past our primary's crash-loop window (STABLE_AFTER)
KEEPALIVE = 5  # seconds, the same for every server (ours defaults to 5, uvicorn 5, gunicorn 2)
SERVERS = ("ours", "gunicorn", "uvicorn")
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
    """One request on a fresh connection; the pid of the worker that served it."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"status {response.status}")
        return int(json.loads(body)["pid"])
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


@dataclass
class WrkResult:
    requests: int = 0
    rps: float = 0.0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non2xx: int = 0
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
    result.per_pid = {int(pid): int(n) for pid, n in WRK_PID.findall(text)}
    return result


class Wrk:
    """`wrk -t2 -c64` against `/`, in the background; `finish()` waits and parses its report.

    `stop()` ends a run early with SIGINT, on which wrk still prints its full report
    for the time it ran: the reload scenario sizes its window to the reloads.
    """

    def __init__(self, port: int, duration: float, script: Path | None = None, out: Path | None = None) -> None:
        args = ["wrk", "-t2", "-c64", f"-d{max(1, round(duration))}s", "--latency"]
        if script is not None:
            args += ["-s", str(script)]
        args.append(f"http://{HOST}:{port}/")
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

    def __init__(self, python: str, workdir: Path, workers: int = WORKERS) -> None:
        self.python = python
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.stderr_path = workdir / f"{self.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "BENCH_OWNER": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        self.env.pop("PYTHONPATH", None)

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

    # shared
    def start(self) -> None:
        with self.stderr_path.open("ab") as stderr:
            self.proc = OWNED.popen(
                self.command(), cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            wait_for(lambda: self._exited_early() or self.is_up(), 60, f"{self.name} up", interval=0.1)
            self._exited_early()
            # Every worker has imported the app and is accepting: a few fresh connections reach them.
            time.sleep(1.0)
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


class Ours(Server):
    name = "ours"

    def __init__(self, python: str, workdir: Path, workers: int = WORKERS) -> None:
        super().__init__(python, workdir, workers)
        self.db = workdir / "state.db"
        script = Path(python).parent / "clusterctl-tui"
        self.cli = [str(script)] if script.exists() else [python, "-m", "runtime"]

    def start(self) -> None:
        # A config file in the working directory: with none, `--app runtime.demo:app` also
        # switches on the demo's extras (a job every minute, a webhook to itself on every
        # cluster event), work the peers would not be doing. Values as the peers get them.
        (self.workdir / "clusterctl.toml").write_text(
            f"# written by tests/bench/run.py\n[server]\nkeepalive_timeout = {KEEPALIVE}\ngraceful_timeout = 30\n"
        )
        super().start()

    def command(self) -> list[str]:
        return [self.python, "-m", "runtime", "up", "--headless", "--app", APP, "--bind", f"{HOST}:{self.port}",
                "--workers", str(self.workers), "--db", str(self.db)]  # fmt: skip

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

    def __init__(self, python: str, workdir: Path, workers: int = WORKERS) -> None:
        super().__init__(python, workdir, workers)
        self.env["PYTHONPATH"] = str(HERE)  # for peer_worker.HttptoolsUvloopWorker

    def command(self) -> list[str]:
        return [self.python, "-m", "gunicorn", "-k", "peer_worker.HttptoolsUvloopWorker", "-w", str(self.workers),
                "-b", f"{HOST}:{self.port}", "--keep-alive", str(KEEPALIVE), "--graceful-timeout", "30", APP]  # fmt: skip

    def reload(self) -> None:
        old = self.worker_pids()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_new_generation(old)


class Uvicorn(Server):
    name = "uvicorn"

    def command(self) -> list[str]:
        return [self.python, "-m", "uvicorn", APP, "--host", HOST, "--port", str(self.port),
                "--workers", str(self.workers), "--http", "httptools", "--loop", "uvloop",
                "--timeout-keep-alive", str(KEEPALIVE), "--no-access-log"]  # fmt: skip

    def reload(self) -> None:
        old = self.worker_pids()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        self.wait_new_generation(old)


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
    born = {}
    for pid in before:
        with contextlib.suppress(psutil.Error):
            born[pid] = psutil.Process(pid).create_time()
    victim = min(born, key=born.__getitem__)
    age = time.time() - born[victim]
    if age < min_age:
        time.sleep(min_age - age)
        age = min_age
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


def scenario_balance(server: Server, duration: float, out: Path) -> dict[str, Any]:
    """(c) wrk -t2 -c64 keep-alive load; requests per worker, max/min."""
    before_pids = server.worker_pids()
    before = _ours_counts(server) if isinstance(server, Ours) else {}
    result = Wrk(server.port, duration, script=LUA_PIDS, out=out).finish()
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


def summarize(runs: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, Any]]:
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
        }
    return summary


def _ms(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return 1000 * statistics.median(found) if found else None


def table(summary: dict[str, dict[str, Any]]) -> str:
    names = list(summary)
    rows = [
        ("a. failed requests over 3 rolling restarts (wrk -c64)", lambda s: fmt(s["reload_failed"], digits=0)),
        ("a. failed requests, each run", lambda s: " / ".join(str(x) for x in s["reload_failed_runs"])),
        ("a. one rolling restart of 4 workers, s", lambda s: fmt(s["reload_seconds"], digits=1)),
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
        ("c. balance max/min, 4 workers (median run)", lambda s: fmt(s["balance_ratio"])),
        ("c. balance max/min, each run", lambda s: " / ".join(fmt(r) for r in s["balance_ratio_runs"])),
        (
            "c. runs in which a worker got no request at all",
            lambda s: f"{s['balance_starved_runs']} of {len(s['balance_ratio_runs'])}",
        ),
        ("c. requests per worker (median run)", lambda s: _median_counts(s)),
        ("c. req/s during the balance run (context only, noisy)", lambda s: fmt(s["balance_rps"], digits=0)),
    ]
    out = ["| figure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, cell in rows:
        out.append(f"| {label} | " + " | ".join(cell(summary[n]) for n in names) + " |")
    return "\n".join(out)


def _median_counts(s: dict[str, Any]) -> str:
    runs = [(r, c) for r, c in zip(s["balance_ratio_runs"], s["balance_counts"], strict=True) if r is not None]
    if not runs:
        return "n/a"
    runs.sort(key=lambda rc: rc[0])
    return " / ".join(str(n) for n in runs[(len(runs) - 1) // 2][1])  # the median_low run


def _median_low(values: list[float]) -> float | None:
    return statistics.median_low(values) if values else None


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each scenario (under 2 minutes)")
    parser.add_argument("--python", metavar="PATH", help="an env with the project, gunicorn and uvicorn-worker")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: ours,gunicorn,uvicorn")
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
    reps = 1 if args.quick else 3
    kills_total = 5
    balance_seconds = 5
    balance_runs = 1 if args.quick else 2  # placement varies a lot from one wrk start to the next

    info = {"machine": machine(), "versions": env_versions(python), "mode": "quick" if args.quick else "full"}
    print(f"machine: {info['machine']}", flush=True)
    print(f"versions: {info['versions']}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="clusterctl-bench-"))
    runs: dict[str, dict[str, list[Any]]] = {
        n: {"reload": [], "kill": [], "kill_young": [], "balance": []} for n in servers
    }
    started = time.monotonic()
    try:
        for rep in range(reps):
            kills = len(range(rep, kills_total, reps))
            for name in servers:
                rundir = workdir / f"{name}-{rep + 1}"
                rundir.mkdir()
                server = SERVER_CLASSES[name](python, rundir)
                server.start()
                try:
                    for b in range(balance_runs):
                        balance = scenario_balance(server, balance_seconds, rundir / f"wrk-balance-{b + 1}.txt")
                        runs[name]["balance"].append(balance)
                        print(f"[{rep + 1}/{reps}] {name:8} c. balance max/min {fmt(balance['ratio'])} "
                              f"counts {balance['counts']} ({balance['rps']:.0f} req/s)", flush=True)  # fmt: skip
                    samples = scenario_kill(server, kills, VICTIM_AGE if name == "ours" else 0.0)
                    runs[name]["kill"].extend(samples)
                    for k in samples:
                        print(f"[{rep + 1}/{reps}] {name:8} b. kill -9 {k['victim']} (age {k['victim_age_s']} s): "
                              f"up {fmt(k['up'] and 1000 * k['up'], ' ms', 0)}, "
                              f"serving {fmt(k['serving'] and 1000 * k['serving'], ' ms', 0)}", flush=True)  # fmt: skip
                    reload = scenario_reload(server, 3, rundir / "wrk-reload.txt")
                    runs[name]["reload"].append(reload)
                    print(f"[{rep + 1}/{reps}] {name:8} a. 3 reloads: {reload['failed']} failed "
                          f"(connect {reload['connect']}, read {reload['read']}, write {reload['write']}, "
                          f"timeout {reload['timeout']}, non-2xx {reload['non2xx']}) of {reload['requests']} "
                          f"in {reload['window_s']} s; reloads took {reload['reload_s']} s"
                          + (f"; ERROR {reload['error']}" if reload["error"] else ""), flush=True)  # fmt: skip
                    young = scenario_kill(server, 1, 0.0)
                    runs[name]["kill_young"].extend(young)
                    for k in young:
                        print(f"[{rep + 1}/{reps}] {name:8} b. kill -9 {k['victim']} (age {k['victim_age_s']} s, "
                              f"just after the reloads): up {fmt(k['up'] and 1000 * k['up'], ' ms', 0)}, "
                              f"serving {fmt(k['serving'] and 1000 * k['serving'], ' ms', 0)}", flush=True)  # fmt: skip
                finally:
                    server.stop()
        summary = summarize(runs)
        info["loadavg_after"] = _loadavg()
        print(f"\n{len(servers)} servers x {reps} interleaved runs, {WORKERS} workers, {time.monotonic() - started:.0f} s; "
              f"load average before {info['machine']['loadavg']}, after {info['loadavg_after']}\n")  # fmt: skip
        print(table(summary))
        if args.json:
            Path(args.json).write_text(json.dumps({**info, "summary": summary, "runs": runs}, indent=2, default=str))
        return 0
    finally:
        OWNED.stop_all()
        if args.keep_logs:
            print(f"\nlogs and wrk outputs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


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
