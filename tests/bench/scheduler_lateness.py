"""Scheduler lateness: how long after its scheduled instant a slot's job process is running.

    python tests/bench/scheduler_lateness.py [--seconds 60]

Runs a headless primary (1 worker, the demo app) with an every-second job
whose command prints the wall time it started (`date +%s.%N`), then reads
`job_runs`: claim lateness (`started_at` − `scheduled_for`, when the slot was
claimed in SQLite) and exec lateness (the job's own clock − `scheduled_for`).
Prints p50 / p99 / max in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "clusterctl.toml"
        config.write_text(
            f'[server]\nbind = "127.0.0.1:{free_port()}"\nworkers = 1\n\n'
            '[[jobs]]\nname = "tick"\nschedule = "* * * * * *"\ncommand = ["date", "+%s.%N"]\n'
        )
        db = Path(tmp) / "state.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "up", "--headless", "--config", str(config), "--db", str(db)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(args.seconds + 3)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        conn = sqlite3.connect(db)
        rows = conn.execute(
            "SELECT scheduled_for, started_at, output FROM job_runs WHERE trigger = 'schedule' AND status = 'succeeded'"
        ).fetchall()
        conn.close()
    claim = [(ts(started) - ts(slot)) * 1000 for slot, started, _ in rows]
    execd = [(float(out.strip()) - ts(slot)) * 1000 for slot, _, out in rows if out.strip()]
    print(f"slots run: {len(rows)} over {args.seconds}s")
    for name, values in (("claimed (started_at)", claim), ("job process running", execd)):
        print(
            f"{name:<22} p50 {statistics.median(values):6.1f} ms   p99 {percentile(values, 0.99):6.1f} ms"
            f"   max {max(values):6.1f} ms"
        )


if __name__ == "__main__":
    # SIGTERM (run.py stopping us) unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
