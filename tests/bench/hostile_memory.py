"""The primary's memory under two hostile loads (issue 9, item 3): a worker printing flat out, and idle connections.

    python tests/bench/hostile_memory.py              # both, 30 s each
    python tests/bench/hostile_memory.py --mode idle --seconds 40

`flood`: two workers of tests/apps/flood_app.py write to stdout as fast as a pipe takes it; a client asks
for `/` every 0.5 s. `idle`: the primary and its workers run with the common 1024-descriptor limit, and
2,200 TCP connections are opened to them and never send a byte (a slowloris, or a load balancer's idle
pool); a client asks for `/` every 0.5 s. Printed: the primary's peak RSS, the client's requests served
and failed, and the "accept failed" lines written (one per episode is the goal, not one per attempt).
Only 127.0.0.1; every process started here is ended by PID.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests" / "apps"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def run(mode: str, seconds: float, tree: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"hostile-{mode}-"))
    port = free_port()
    app = "flood_app:app" if mode == "flood" else "asgi_app:app"
    args = [sys.executable, "-m", "runtime", "up", "--headless", "--bind", f"127.0.0.1:{port}"]
    args += ["--db", str(tmp / "state.db"), "--app", app, "--workers", "2"]

    def limit_fds() -> None:
        if mode == "idle":
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    # --tree: measure another checkout (`git archive <commit> | tar -x -C DIR`) with the same apps.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(APPS)])}
    err = (tmp / "primary.err").open("wb")
    primary = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit_fds)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while not probe(port):
            if time.monotonic() > deadline or primary.poll() is not None:
                raise SystemExit(f"the cluster did not start; see {tmp / 'primary.err'}")
            time.sleep(0.1)
        if mode == "idle":
            for _ in range(2200):
                conn = socket.socket()
                conn.setblocking(False)
                conn.connect_ex(("127.0.0.1", port))
                idle.append(conn)
        me = psutil.Process(primary.pid)
        peak = ok = failed = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peak = max(peak, me.memory_info().rss)
            if probe(port):
                ok += 1
            else:
                failed += 1
            time.sleep(0.5)  # pacing
    finally:
        for conn in idle:
            conn.close()
        children = psutil.Process(primary.pid).children(recursive=True) if primary.poll() is None else []
        primary.kill()
        primary.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        err.close()
    logs = tmp / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("workers.log*")) if logs.exists() else ""
    accept_failed = text.count("accept failed") + (tmp / "primary.err").read_text(errors="replace").count(
        "accept failed"
    )
    print(
        f"{mode:<6} {seconds:>4.0f}s  primary peak RSS {peak / 1048576:6.1f} MiB  "
        f"requests ok {ok:>3} failed {failed:>3}  'accept failed' lines {accept_failed}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("flood", "idle", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args()
    for mode in ("flood", "idle") if args.mode == "both" else (args.mode,):
        run(mode, args.seconds, args.tree.resolve())


if __name__ == "__main__":
    main()
