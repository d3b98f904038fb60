"""What `clusterctl-tui attach` costs: time to its first full frame, and the primary's CPU per attached console.

    python tests/bench/attach_cost.py [--reps 7] [--seconds 20] [--workers 8] [--rate 50]

Needs tmux (Debian: tmux) and psutil. A headless primary serves the bundled demo app (no `--app`, no
config file, so the demo's extras are on: a job every minute, a webhook to itself on each cluster
event) with `--workers` workers on 127.0.0.1, its store in a temp dir. Every console is a real
`clusterctl-tui attach --db <tmp>/state.db` process in a detached tmux session at 100x30, each on a
tmux server of its own (`tmux -L <unique name>`). The screen is read with `tmux capture-pane -p`.

1. attach → first full frame: from just before `tmux new-session` starts the attach command until
   `capture-pane`, polled every 10 ms, shows "8/8 ready" and 8 worker rows in state `ready`.
   `--reps` times (`q` closes the console between reps); min / median / max, and every rep, and
   also until the first non-blank screen (the console has started and drawn anything). For
   comparison, the same for the in-process console, `clusterctl-tui --bind ... --workers 8` in
   tmux until the same frame: that one includes starting the primary and its 8 workers, and it is a
   fresh primary (temp store, port) every rep.
2. The primary's CPU with 0, 1 and 3 consoles attached: user + system time of the primary process
   alone (psutil, `cpu_times()` before and after a window of `--seconds`), as % of one core; the
   attached consoles' own CPU the same way, summed (and per console). Consoles are attached, their
   frame is waited for, then 3 s settle before the window. Idle cluster (0, 1, 3 consoles), then with
   a light load (0 rate disables it): one thread making `--rate` GET / a second on one keep-alive
   http.client connection (3, 1, 0 consoles; `q` detaches them).

Everything started is ended by PID: the primary by `clusterctl-tui stop` (SIGKILL to it and its
workers if that fails), every tmux server by `kill-server` (SIGKILL to any survivor of its panes).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CLI = str(Path(sys.executable).with_name("clusterctl-tui"))
WIDTH, HEIGHT = 100, 30
POLL = 0.01  # seconds between screen captures
SETTLE = 3.0  # seconds after the consoles' frame before a CPU window
ROW = re.compile(r"^\s*\d+\s+\d+\s+ready\s", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------ one console, in its own tmux server


class Screen:
    """A tmux server of our own with one detached 100x30 session running `cmd`."""

    made = 0
    alive: list[Screen] = []  # every server not yet killed, for the finally blocks

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        Screen.made += 1
        self.name = f"attach-cost-{os.getpid()}-{Screen.made}"
        self.panes: list[psutil.Process] = []  # the pane's process and its descendants, as last seen
        self.first_paint: float | None = None  # seconds from the launch until the screen showed anything
        Screen.alive.append(self)
        self.started = time.perf_counter()
        subprocess.run(
            [*self.tmux("new-session", "-d", "-s", "bench", "-x", str(WIDTH), "-y", str(HEIGHT), "-c", str(cwd))]
            + ["exec " + shlex.join(cmd)],
            check=True,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
        )

    def tmux(self, *args: str) -> list[str]:
        return ["tmux", "-L", self.name, "-f", "/dev/null", *args]

    def capture(self) -> str | None:
        result = subprocess.run([*self.tmux("capture-pane", "-p", "-t", "bench")], capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else None

    def wait_frame(self, workers: int, timeout: float) -> float:
        """Seconds from the launch until the workers table is filled in; polled every 10 ms."""
        deadline = time.monotonic() + timeout
        screen = None
        while time.monotonic() < deadline:
            text = self.capture()
            if text is None:
                raise SystemExit(f"the console in tmux {self.name} exited; last screen:\n{screen}")
            screen = text
            if self.first_paint is None and text.strip():
                self.first_paint = time.perf_counter() - self.started
            if f"{workers}/{workers} ready" in text and len(ROW.findall(text)) == workers:
                elapsed = time.perf_counter() - self.started
                self.remember()
                return elapsed
            time.sleep(POLL)
        raise SystemExit(f"no full frame within {timeout:.0f} s; last screen:\n{screen}")

    def remember(self) -> None:
        out = subprocess.run([*self.tmux("display-message", "-p", "-t", "bench", "#{pane_pid}")], capture_output=True)
        with contextlib.suppress(ValueError, psutil.Error):
            pane = psutil.Process(int(out.stdout))
            self.panes = [pane, *pane.children(recursive=True)]

    def quit(self, timeout: float = 10) -> None:
        """`q`, then wait for the pane's process to exit; the server goes with its last session."""
        subprocess.run([*self.tmux("send-keys", "-t", "bench", "q")], capture_output=True)
        psutil.wait_procs(self.panes[:1], timeout=timeout)
        self.kill()

    def kill(self) -> None:
        subprocess.run([*self.tmux("kill-server")], capture_output=True)
        with contextlib.suppress(OSError):  # the socket file of our own server
            (Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.name).unlink()
        _, survivors = psutil.wait_procs(self.panes, timeout=5)
        for proc in survivors:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self in Screen.alive:
            Screen.alive.remove(self)


# ------------------------------------------------------------------ the headless primary


class Primary:
    def __init__(self, tmp: Path, workers: int) -> None:
        self.db = tmp / "state.db"
        self.port = free_port()
        self.workers = workers
        self.err = (tmp / "primary.err").open("wb")
        cmd = [CLI, "up", "--headless", "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)]
        self.proc = subprocess.Popen(
            [*cmd, "--db", str(self.db)], cwd=tmp, env=cli_env(), stdout=subprocess.DEVNULL, stderr=self.err
        )
        self.tree: list[psutil.Process] = []
        self.pid = 0

    def wait_ready(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the primary exited: {Path(self.err.name).read_text()[-2000:]}")
            current = status(self.db)
            if current and sum(w["state"] == "ready" for w in current["workers"]) == self.workers:
                primary = psutil.Process(current["primary"]["pid"])
                self.tree = [primary, *primary.children(recursive=True)]
                self.pid = primary.pid
                return self.pid
            time.sleep(0.2)
        raise SystemExit("the cluster did not come up")

    def stop(self) -> None:
        tree = list(self.tree)
        with contextlib.suppress(psutil.Error):  # the workers of now, too
            tree += psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            tree.append(psutil.Process(self.proc.pid))
        stop_tree(self.db, tree)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.err.close()


def status(db: Path) -> dict | None:
    result = subprocess.run(
        [CLI, "status", "--json", "--db", str(db)], capture_output=True, text=True, env=cli_env(), timeout=30
    )
    return json.loads(result.stdout) if result.returncode == 0 else None


def stop_tree(db: Path, tree: list[psutil.Process]) -> None:
    """`clusterctl-tui stop`, then SIGKILL whatever of `tree` (processes we started) is still there."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([CLI, "stop", "--db", str(db)], capture_output=True, env=cli_env(), timeout=40)
    _, survivors = psutil.wait_procs(tree, timeout=30)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=5)


# ------------------------------------------------------------------ light load


class Load(threading.Thread):
    """GET / at `rate` a second on one keep-alive connection to 127.0.0.1 (reconnecting on error)."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.rate = port, rate
        self.done = threading.Event()
        self.ok = self.errors = 0

    def run(self) -> None:
        conn = None
        next_at = time.monotonic()
        while not self.done.is_set():
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                self.ok += response.status == 200
                self.errors += response.status != 200
            except (OSError, http.client.HTTPException):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            next_at += 1 / self.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                self.done.wait(delay)
            elif delay < -1:
                next_at = time.monotonic()
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.done.set()
        self.join(10)


# ------------------------------------------------------------------ measuring


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def window(primary: psutil.Process, consoles: list[psutil.Process], seconds: float, load: Load | None) -> dict:
    requests = load.ok if load else 0
    p0, c0, t0 = cpu_seconds([primary]), cpu_seconds(consoles), time.monotonic()
    time.sleep(seconds)
    p1, c1, wall = cpu_seconds([primary]), cpu_seconds(consoles), time.monotonic() - t0
    return {
        "primary": (p1 - p0) / wall * 100,
        "consoles": (c1 - c0) / wall * 100,
        "rss": primary.memory_info().rss,
        "rps": ((load.ok if load else 0) - requests) / wall,
    }


def spread(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    each = ", ".join(f"{v:.0f}" for v in ms)
    return f"{min(ms):.0f} / {statistics.median(ms):.0f} / {max(ms):.0f} ms  (each: {each})"


def attach(db: Path, cwd: Path, workers: int) -> tuple[Screen, float]:
    screen = Screen([CLI, "attach", "--db", str(db)], cwd)
    return screen, screen.wait_frame(workers, timeout=30)


def attach_latency(primary: Primary, cwd: Path, reps: int) -> tuple[list[float], list[float]]:
    """(launch → full frame, launch → first non-blank screen) of each rep."""
    times, paints = [], []
    for _ in range(reps):
        screen, elapsed = attach(primary.db, cwd, primary.workers)
        times.append(elapsed)
        paints.append(screen.first_paint if screen.first_paint is not None else elapsed)
        screen.quit()
        time.sleep(0.5)
    return times, paints


def in_process_latency(reps: int, workers: int) -> list[float]:
    times = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            db = tmp / "state.db"
            cmd = [CLI, "--bind", f"127.0.0.1:{free_port()}", "--workers", str(workers), "--db", str(db)]
            screen = Screen(cmd, tmp)
            try:
                times.append(screen.wait_frame(workers, timeout=60))
            finally:
                if not screen.panes:  # no frame: take the launcher, the primary and its workers now
                    screen.remember()
                stop_tree(db, screen.panes)
                screen.kill()
    return times


def cpu_table(primary: Primary, cwd: Path, seconds: float, rate: float) -> list[tuple[str, int, dict]]:
    proc = psutil.Process(primary.pid)
    rows: list[tuple[str, int, dict]] = []
    screens: list[Screen] = []

    def consoles(n: int) -> None:
        while len(screens) > n:
            screens.pop().quit()
        while len(screens) < n:
            screens.append(attach(primary.db, cwd, primary.workers)[0])
        time.sleep(SETTLE)

    def measure(label: str, load: Load | None) -> None:
        panes = [s.panes[0] for s in screens]
        result = window(proc, panes, seconds, load)
        rows.append((label, len(screens), result))
        print(
            f"  {label:<5} {len(screens)} console(s): primary {result['primary']:.2f}%, "
            f"consoles {result['consoles']:.2f}%",
            file=sys.stderr,
            flush=True,
        )

    for n in (0, 1, 3):
        consoles(n)
        measure("idle", None)
    if rate > 0:
        load = Load(primary.port, rate)
        load.start()
        try:
            for n in (3, 1, 0):
                consoles(n)
                measure(f"{rate:g}/s", load)
        finally:
            load.stop()
    for screen in screens:
        screen.quit()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="attaches timed, and in-process starts (default 7)")
    parser.add_argument("--seconds", type=float, default=20, help="each CPU window (default 20)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=50, help="requests a second in the loaded rows; 0: none")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process console's start-up")
    args = parser.parse_args()
    if not shutil.which("tmux"):
        raise SystemExit("tmux is needed (Debian: apt-get install tmux)")
    n = args.workers
    print(
        f"{psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {n} workers, demo app, console {WIDTH}x{HEIGHT}"
    )
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            primary = Primary(tmp, n)
            try:
                primary.wait_ready()
                time.sleep(SETTLE)
                attach_times, paints = attach_latency(primary, tmp, args.reps)
                print(
                    f"attach → first full frame ({n}/{n} ready, {n} rows), min / median / max: {spread(attach_times)}"
                )
                print(f"  of which, attach → first non-blank screen:             {spread(paints)}")
                rows = cpu_table(primary, tmp, args.seconds, args.rate)
            finally:
                primary.stop()
        if not args.no_in_process:
            started = in_process_latency(args.reps, n)
            print(
                f"in-process console, launch → {n}/{n} ready (starts the primary and {n} workers too), "
                f"min / median / max: {spread(started)}"
            )
    finally:
        for screen in list(Screen.alive):
            screen.kill()
    print(f"\nCPU, % of one core, over {args.seconds:g} s windows (primary process alone; consoles summed)")
    print(
        f"{'load':<10} {'consoles':>8} {'primary CPU':>12} {'consoles CPU':>13} {'per console':>12} {'primary RSS':>12} {'req/s':>7}"
    )
    for label, count, r in rows:
        each = f"{r['consoles'] / count:.2f}%" if count else "-"
        print(
            f"{label:<10} {count:>8} {r['primary']:>11.2f}% {r['consoles']:>12.2f}% {each:>12} "
            f"{r['rss'] / 1048576:>8.0f} MiB {r['rps']:>7.1f}"
        )


if __name__ == "__main__":
    # SIGTERM unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
