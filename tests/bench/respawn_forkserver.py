"""kill -9 → the replacement serving, and private memory per worker: fork server, preload_app, fresh interpreters.

    python tests/bench/respawn_forkserver.py [--kills 15] [--workers 1,2] [--app MODULE:ATTR]
                                             [--tree PATH]

Modes, each a fresh headless primary serving `--app` (default: this module's plain ASGI `app`):

- forkserver: workers forked by the generation's fork server (the default);
- preload: the same with `[server] preload_app = true`;
- fresh: with `--tree PATH` only, the primary of another checkout (e.g. `git archive HEAD~1 | tar -x -C
  /tmp/old`, before the fork server), whose workers are fresh interpreters. The measuring side is this one.

Figures:
- kill → serving: SIGKILL of the oldest ready worker until a request on a new connection is answered by
  a pid that was not serving before. With 1 worker, one request sent right after the kill waits in the
  listen backlog until the replacement answers it; with 2, fresh connections are tried every 2 ms (the
  survivor answers those until the replacement accepts). Median, p90 and max over `--kills`;
- crashed → ready: the same kills from the primary's side, between its `crashed` and the replacement's
  `ready` rows in worker_events (stamped by the store's writer thread: a few ms late, alike for both);
- memory: USS (pages only this process maps) and PSS (its share of everything it maps) of each of 4
  workers after 200 requests, and of the fork server, from psutil's memory_full_info().

Runs on 127.0.0.1 only; every process started is ended by PID.
"""

from __future__ import annotations

import os
from typing import Any

BODY = b"ok"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"x-pid", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


if __name__ == "__main__":
    import argparse
    import contextlib
    import http.client
    import signal
    import socket
    import statistics
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import psutil

    HERE = Path(__file__).resolve().parent
    ROOT = HERE.parent.parent
    MEMORY_WORKERS = 4

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def served_by(port: int, timeout: float = 10.0) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            return int(response.getheader("x-pid") or 0)
        finally:
            conn.close()

    class Primary:
        def __init__(self, tree: Path, target: str, workers: int, preload: bool, tmp: Path) -> None:
            self.port = free_port()
            self.db = tmp / "state.db"
            config = tmp / "clusterctl.toml"
            config.write_text("[server]\n" + ("preload_app = true\n" if preload else ""))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(HERE), str(ROOT / "tests" / "apps")])}
            cmd = [sys.executable, "-m", "runtime", "up", "--headless", "--app", target, "--config", str(config)]
            cmd += ["--bind", f"127.0.0.1:{self.port}", "--workers", str(workers), "--db", str(self.db)]
            self.err = (tmp / "primary.err").open("wb")
            self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=self.err)
            self.workers = workers
            self.tmp = tmp

        def status(self) -> dict[str, Any] | None:
            from runtime.control import ControlError, request, socket_path

            try:
                return request(socket_path(self.db, self.proc.pid), "status", timeout=10)
            except ControlError:
                return None

        def ready(self, timeout: float = 60) -> list[dict[str, Any]]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the primary exited:\n{(self.tmp / 'primary.err').read_text()[-2000:]}")
                status = self.status()
                workers = status["workers"] if status else []
                if len(workers) == self.workers and all(w["state"] == "ready" for w in workers):
                    return workers
                time.sleep(0.05)
            raise SystemExit("the cluster did not come up")

        def crashed_to_ready(self) -> list[float]:
            import sqlite3
            from datetime import datetime

            conn = sqlite3.connect(self.db)
            try:
                rows = conn.execute("SELECT ts, worker_id, event FROM worker_events ORDER BY id").fetchall()
            finally:
                conn.close()
            gaps, crashed = [], {}
            for ts, slot, event in rows:
                at = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
                if event == "crashed":
                    crashed[slot] = at
                elif event == "ready" and slot in crashed:
                    gaps.append(at - crashed.pop(slot))
            return gaps

        def fork_server(self) -> psutil.Process | None:
            workers = {w["pid"] for w in self.ready()}
            for child in psutil.Process(self.proc.pid).children():
                if child.pid not in workers and "runtime.forkserver" in child.cmdline():
                    return child
            return None

        def stop(self) -> None:
            family = [self.proc.pid]
            with contextlib.suppress(psutil.Error):
                family += [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            for pid in family:  # ours, by pid: whatever did not end with the primary
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
            self.err.close()

    def kill_to_serving(primary: Primary) -> float:
        workers = primary.ready()
        time.sleep(0.3)  # let the last replacement settle (pacing between kills, not synchronisation)
        before = {w["pid"] for w in workers}
        victim = min(before, key=lambda pid: psutil.Process(pid).create_time())
        os.kill(victim, signal.SIGKILL)
        killed = time.perf_counter()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if served_by(primary.port) not in before:
                    return time.perf_counter() - killed
            time.sleep(0.002)
        raise SystemExit("no replacement served within 30 s")

    def memory(primary: Primary) -> dict[str, Any]:
        primary.ready()
        for _ in range(200):
            served_by(primary.port)
        rows = []
        for worker in primary.ready():
            info = psutil.Process(worker["pid"]).memory_full_info()
            rows.append((info.uss, info.pss, info.rss))
        server = primary.fork_server()
        server_info = server.memory_full_info() if server is not None else None
        return {"workers": rows, "server": server_info}

    def mib(n: float) -> str:
        return f"{n / 1048576:6.1f}"

    def main() -> None:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--kills", type=int, default=15)
        parser.add_argument("--workers", default="1,2")
        parser.add_argument("--app", default="respawn_forkserver:app")
        parser.add_argument("--tree", type=Path, help="another checkout, run as the 'fresh' mode")
        args = parser.parse_args()
        modes = [("forkserver", ROOT, False), ("preload", ROOT, True)]
        if args.tree:
            modes.append(("fresh", args.tree.resolve(), False))
        counts = [int(n) for n in args.workers.split(",")]
        results: dict[tuple[str, int], list[float]] = {}
        sides: dict[tuple[str, int], list[float]] = {}
        mem: dict[str, dict[str, Any]] = {}
        try:
            for name, tree, preload in modes:
                for count in counts:
                    with tempfile.TemporaryDirectory() as tmp:
                        primary = Primary(tree, args.app, count, preload, Path(tmp))
                        try:
                            primary.ready()
                            times = [kill_to_serving(primary) for _ in range(args.kills)]
                            sides[(name, count)] = primary.crashed_to_ready()
                        finally:
                            primary.stop()
                    results[(name, count)] = times
                    print(f"{name:10} {count} worker(s): " + " ".join(f"{t * 1000:.0f}" for t in times) + " ms")
                with tempfile.TemporaryDirectory() as tmp:
                    primary = Primary(tree, args.app, MEMORY_WORKERS, preload, Path(tmp))
                    try:
                        mem[name] = memory(primary)
                    finally:
                        primary.stop()
        except KeyboardInterrupt:
            raise SystemExit(130) from None

        print(f"\nkill -9 → a new connection served by the replacement, ms ({args.kills} kills, app {args.app})")
        print(f"{'mode':10} {'workers':>7} {'median':>7} {'p90':>7} {'max':>7}   crashed → ready: median, max")
        for (name, count), times in results.items():
            ms = sorted(t * 1000 for t in times)
            p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
            side = sorted(t * 1000 for t in sides[(name, count)]) or [float("nan")]
            print(
                f"{name:10} {count:7} {statistics.median(ms):7.1f} {p90:7.1f} {ms[-1]:7.1f}"
                f"   {statistics.median(side):7.1f} {side[-1]:7.1f}"
            )
        print(f"\nmemory per worker, MiB ({MEMORY_WORKERS} workers after 200 requests): USS / PSS / RSS each")
        for name, figures in mem.items():
            cells = "  ".join(f"{mib(u)}/{mib(p)}/{mib(r)}" for u, p, r in figures["workers"])
            uss = statistics.median(u for u, _, _ in figures["workers"])
            pss = statistics.median(p for _, p, _ in figures["workers"])
            print(f"{name:10} median USS {mib(uss)}  PSS {mib(pss)}   [{cells}]")
            server = figures["server"]
            if server is not None:
                print(f"{'':10} fork server USS {mib(server.uss)}  PSS {mib(server.pss)}  RSS {mib(server.rss)}")

    main()
