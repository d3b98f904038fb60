"""How long a worker killed with SIGKILL takes to come back while its neighbour floods the primary with output.

    python tests/bench/respawn_under_output.py [--rate 50000] [--kills 7] [--modes headless,console]
                                               [--tree PATH]

A primary with 2 workers serves this module's `app`. Worker 1 writes `--rate` lines a second to its
stdout (paced every 10 ms); worker 2 is quiet and is the victim: it gets SIGKILL `--kills` times,
3 s apart (an outside SIGKILL never counts toward the crash-loop back-off at that pace). Each mode
runs once quiet (rate 0) and once flooded:

- headless: `python -m runtime up --headless`; its stderr (now also every worker line) goes to a file;
- console: the Textual console drives the primary in-process (`App.run_test()`, 100x30, no terminal
  needed), on the Events tab, so every line it shows is written into its RichLog on the loop that
  also reaps and respawns workers.

Figures, median (max) over the kills:
- kill → ready: SIGKILL until `status` shows slot 2 with a new pid in state `ready` (polled every
  10 ms on the control socket);
- crashed → spawned: the primary's own `worker_events` timestamps, i.e. how late the event loop
  noticed the death and started the replacement;
- status round trip: every poll's round trip on the control socket (a direct reading of loop lag);
- the primary's CPU, % of one core, over the kills.

`--tree PATH` runs the primary from another checkout (e.g. `git archive HEAD | tar -x -C /tmp/old`
for a before/after); the measuring side always uses this one. Every process started is ended by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LINE = b"flooding the primary with output, line after line after line after line\n"
VICTIM = 2
SPACING = 3.0  # seconds between kills


# ------------------------------------------------------------------ the app the workers serve


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


def _flood(rate: int) -> None:
    per_tick = max(1, rate // 100)
    chunk = LINE * per_tick
    next_at = time.monotonic()
    while True:
        os.write(1, chunk)
        next_at += per_tick / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


if (
    __name__ != "__main__"
    and os.environ.get("CLUSTERCTL_INSTANCE_TYPE") == "worker"
    and os.environ.get("CLUSTERCTL_WORKER_ID") == "1"
    and int(os.environ.get("FLOOD_LINES_PER_SECOND", "0")) > 0
):
    threading.Thread(target=_flood, args=(int(os.environ["FLOOD_LINES_PER_SECOND"]),), daemon=True).start()


# ------------------------------------------------------------------ the console child


async def _console_child(bind: str, db: str) -> None:
    from console.app import ClusterConsole
    from runtime import Primary, load_settings

    settings = load_settings(None, {"app": "respawn_under_output:app", "bind": bind, "workers": "2", "db": db})
    console = ClusterConsole(Primary(settings))
    async with console.run_test(size=(100, 30)) as pilot:
        await pilot.press("4")  # the Events tab: worker lines are drawn
        while console.is_running:  # until SIGTERM stops the primary, and the primary the console
            await pilot.pause(0.5)


# ------------------------------------------------------------------ measuring


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Run:
    def __init__(self, mode: str, rate: int, tree: Path, tmp: Path) -> None:
        self.db = tmp / "state.db"
        bind = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tree), str(HERE)]),
            "FLOOD_LINES_PER_SECOND": str(rate),
        }
        if mode == "headless":
            cmd = [sys.executable, "-m", "runtime", "up", "--headless", "--app", "respawn_under_output:app"]
            cmd += ["--bind", bind, "--workers", "2", "--db", str(self.db)]
        else:
            cmd = [sys.executable, str(HERE / "respawn_under_output.py"), "--console-child", bind, str(self.db)]
        self.stderr = (tmp / "primary.err").open("wb")
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.rtts: list[float] = []
        self.socket: Path | None = None

    def status(self) -> dict[str, Any] | None:
        from runtime.control import ControlError, request, socket_path

        self.socket = self.socket or socket_path(self.db, self.proc.pid)
        started = time.perf_counter()
        try:
            result = request(self.socket, "status", timeout=10)
        except ControlError:
            return None
        self.rtts.append(time.perf_counter() - started)
        return result

    def workers(self) -> dict[int, dict[str, Any]]:
        status = self.status()
        return {w["id"]: w for w in status["workers"]} if status else {}

    def wait_ready(self, timeout: float = 60) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the primary exited: {(self.db.parent / 'primary.err').read_text()[-2000:]}")
            workers = self.workers()
            if len(workers) == 2 and all(w["state"] == "ready" for w in workers.values()):
                return workers
            time.sleep(0.1)
        raise SystemExit("the cluster did not come up")

    def kill_and_wait(self) -> float:
        old = self.workers()[VICTIM]["pid"]
        os.kill(old, signal.SIGKILL)
        killed = time.perf_counter()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            worker = self.workers().get(VICTIM)
            if worker and worker["pid"] not in (None, old) and worker["state"] == "ready":
                return time.perf_counter() - killed
            time.sleep(0.01)
        raise SystemExit(f"worker {VICTIM} did not come back within 30 s")

    def crashed_to_spawned(self) -> list[float]:
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute(
                "SELECT ts, event FROM worker_events WHERE worker_id = ? ORDER BY id", (VICTIM,)
            ).fetchall()
        finally:
            conn.close()
        gaps, crashed = [], None
        for ts, event in rows:
            if event == "crashed":
                crashed = iso_seconds(ts)
            elif event == "spawned" and crashed is not None:
                gaps.append(iso_seconds(ts) - crashed)
                crashed = None
        return gaps

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()


def measure(mode: str, rate: int, kills: int, tree: Path) -> dict[str, Any]:
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        run = Run(mode, rate, tree, Path(tmp))
        try:
            run.wait_ready()
            time.sleep(3)  # the flood at full rate, start-up settled
            run.rtts.clear()
            primary = psutil.Process(run.proc.pid)
            cpu_before, wall_before = primary.cpu_times(), time.monotonic()
            ready = []
            for n in range(kills):
                if n:
                    time.sleep(SPACING)
                ready.append(run.kill_and_wait())
            cpu_after, wall = primary.cpu_times(), time.monotonic() - wall_before
            cpu = (cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system) / wall * 100
            gaps = run.crashed_to_spawned()
            rtts = sorted(run.rtts)
        finally:
            run.stop()
    return {
        "ready_ms": [x * 1000 for x in ready],
        "spawn_ms": [x * 1000 for x in gaps],
        "rtt_p50_ms": rtts[len(rtts) // 2] * 1000,
        "rtt_p99_ms": rtts[int(len(rtts) * 0.99)] * 1000,
        "rtt_max_ms": rtts[-1] * 1000,
        "cpu": cpu,
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} ({max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=50_000, help="lines a second from worker 1 (default 50000)")
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--modes", default="headless,console")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout the primary runs from")
    parser.add_argument("--console-child", nargs=2, metavar=("BIND", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.console_child:
        asyncio.run(_console_child(*args.console_child))
        return
    sys.path.insert(0, str(ROOT))
    print(f"primary from {args.tree}; worker {VICTIM} killed {args.kills} times, {SPACING:g} s apart")
    print(
        f"{'mode':<9} {'neighbour, lines/s':>18} {'kill→ready ms':>16} {'crashed→spawned ms':>19} "
        f"{'status rtt p50/p99/max ms':>26} {'primary CPU':>11}"
    )
    for mode in args.modes.split(","):
        for rate in (0, args.rate):
            r = measure(mode, rate, args.kills, args.tree.resolve())
            rtt = f"{r['rtt_p50_ms']:.1f} / {r['rtt_p99_ms']:.1f} / {r['rtt_max_ms']:.0f}"
            print(
                f"{mode:<9} {rate:>18} {summary(r['ready_ms']):>16} {summary(r['spawn_ms']):>19} "
                f"{rtt:>26} {r['cpu']:>10.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    # SIGTERM unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
