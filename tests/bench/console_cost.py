"""The primary's own CPU and memory with 8 idle workers: headless, and with the console drawing at 1 Hz.

    python tests/bench/console_cost.py [--seconds 30] [--workers 8]

The console needs a terminal: it runs inside a detached tmux session (Debian:
tmux) at 100x30. CPU is the primary process's own user+system time over the
window, as a percentage of one core; workers are not included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(db: Path) -> dict | None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "status", "--json", "--db", str(db)], capture_output=True, text=True
    )
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_ready(db: Path, workers: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = status(db)
        if current and sum(w["state"] == "ready" for w in current["workers"]) == workers:
            return current["primary"]["pid"]
        time.sleep(0.2)
    raise SystemExit("cluster did not come up")


def measure(pid: int, seconds: float) -> tuple[float, int]:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / seconds * 100, proc.memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    base = [sys.executable, "-m", "runtime", "up", "--app", "runtime.demo:app", "--workers", str(args.workers)]
    for mode in ("headless", "console"):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "state.db"
            cmd = [*base, "--bind", f"127.0.0.1:{free_port()}", "--db", str(db)]
            session = f"clusterctl-bench-{os.getpid()}"
            if mode == "headless":
                proc = subprocess.Popen([*cmd, "--headless"], stderr=subprocess.DEVNULL)
            else:
                if not shutil.which("tmux"):
                    print("console: skipped (tmux not installed)")
                    continue
                subprocess.run(
                    ["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", " ".join(cmd)], check=True
                )
            pid = None
            try:
                pid = wait_ready(db, args.workers)
                time.sleep(3)  # let start-up settle
                cpu, rss = measure(pid, args.seconds)
                print(
                    f"{mode:<9} primary CPU {cpu:5.2f}% of one core, RSS {rss / 1048576:.0f} MiB"
                    f" ({args.workers} idle workers)"
                )
            finally:
                stop(pid, proc if mode == "headless" else None)
                if mode == "console":
                    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def stop(pid: int | None, proc: subprocess.Popen | None) -> None:
    """SIGTERM the primary (the headless one is our child: by its Popen) and wait up to 30 s for it to go."""
    if pid is None and proc is not None:
        pid = proc.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)


if __name__ == "__main__":
    # SIGTERM (run.py stopping us) unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
