"""Webhook throughput: emit() cost per call, and deliveries per second to a local receiver.

    python tests/bench/webhooks.py [--events 5000] [--concurrency 32]

1. `emit()` into a store with one endpoint, from this process: microseconds per call.
2. A headless primary (1 worker) delivers that backlog to a local receiver
   (uvicorn, one process, 204 No Content, on 127.0.0.1): deliveries per second
   from the primary's start until the last one is recorded `delivered`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECEIVER = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    from runtime import emit
    from runtime.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "receiver.py").write_text(RECEIVER)
        hook_port, app_port = free_port(), free_port()
        db = tmpdir / "state.db"
        store = Store(db)
        store.sync_endpoints(
            [{"name": "bench", "url": f"http://127.0.0.1:{hook_port}/", "events": ["*"], "max_attempts": 3}]
        )
        store.close()
        started = time.perf_counter()
        for i in range(args.events):
            emit("bench.event", {"i": i, "note": "a small payload"}, db=db)
        per_call_us = (time.perf_counter() - started) / args.events * 1e6
        print(f"emit(): {per_call_us:.0f} µs per call ({args.events} calls, one endpoint, WAL)")

        config = tmpdir / "clusterctl.toml"
        config.write_text(
            f'[server]\nbind = "127.0.0.1:{app_port}"\nworkers = 1\n\n'
            f'[[webhooks]]\nname = "bench"\nurl = "http://127.0.0.1:{hook_port}/"\nevents = ["*"]\n'
            f'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\nconcurrency = {args.concurrency}\n'
        )
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "receiver:app",
                "--port",
                str(hook_port),
                "--log-level",
                "warning",
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--no-access-log",
            ],
            cwd=tmpdir,
        )
        primary = None
        try:
            wait_port(hook_port)
            started = time.perf_counter()
            primary = subprocess.Popen(
                [sys.executable, "-m", "runtime", "up", "--headless", "--config", str(config), "--db", str(db)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            conn = sqlite3.connect(db)
            delivered = 0
            deadline = time.monotonic() + 300
            while delivered < args.events and time.monotonic() < deadline:
                time.sleep(0.1)
                delivered = conn.execute(
                    "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'delivered'"
                ).fetchone()[0]
            elapsed = time.perf_counter() - started
            conn.close()
            print(
                f"delivery: {delivered} of {args.events} in {elapsed:.1f}s = {delivered / elapsed:.0f} deliveries/s"
                f" (concurrency {args.concurrency}, including the primary's start)"
            )
        finally:
            for proc in (primary, receiver):
                if proc is not None and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.wait(30)


if __name__ == "__main__":
    # SIGTERM (run.py stopping us) unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
