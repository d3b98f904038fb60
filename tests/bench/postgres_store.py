"""The PostgreSQL store against SQLite, on loopback: emit(), slot claims, deliveries per second, takeover.

    eval "$(tests/pg.sh start)"                     # a throwaway server (or set CLUSTERCTL_TEST_PG_URL)
    .venv/bin/python tests/bench/postgres_store.py [--events 3000] [--calls 2000] [--skip-takeover]

1. `emit()` from this process, one endpoint: p50/p99 per call, SQLite (WAL) and PostgreSQL.
2. `claim_slot()` of a new slot (one transaction, the UNIQUE insert): p50/p99, both backends.
3. Deliveries per second to a local receiver (uvicorn, 204, one process) by 1 and by 3 headless
   primaries sharing the database: a backlog of `--events` committed at once once every primary is
   up, timed until the last one is recorded `delivered`.
4. Takeover: a primary delivering to a slow receiver (0.5 s a request, timeout 1 s: a 31 s lease) is
   killed with SIGKILL while another runs; the time until the other has sent every delivery the
   dead one had leased.

Each part uses a database of its own, created and dropped here; every process started is ended
by PID on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/receiver.py

from receiver import Answer, Receiver  # noqa: E402
from webhooks import RECEIVER, free_port  # noqa: E402  (this directory's webhook benchmark)

from runtime import emit  # noqa: E402
from runtime.store import open_store_url  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1e6:.0f} µs, p99 {cuts[98] * 1e6:.0f} µs"


@contextmanager
def database(server: str) -> Iterator[str]:
    name = f"clusterctl_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def endpoint(port: int) -> dict[str, object]:
    return {"name": "bench", "url": f"http://127.0.0.1:{port}/", "events": ["*"], "max_attempts": 3}


def time_emit(where: str, calls: int) -> list[float]:
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        emit("bench.event", {"n": n, "note": "a small payload"}, db=where)
        samples.append(time.perf_counter() - started)
    return samples


def time_claims(where: str, calls: int) -> list[float]:
    store = open_store_url(where)
    try:
        samples = []
        for n in range(calls):
            slot = f"2027-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000Z"
            started = time.perf_counter()
            store.claim_slot("bench", slot, "schedule", 1, "allow")
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        store.close()


class Primaries:
    """Headless primaries sharing `url`, each in its own directory; ended by PID."""

    def __init__(self, tmp: Path, url: str, hook_url: str, concurrency: int, timeout: float = 10) -> None:
        self.tmp = tmp
        self.url = url
        self.config = tmp / f"clusterctl-{uuid.uuid4().hex[:6]}.toml"
        self.config.write_text(
            f'[store]\nurl = "{url}"\n\n[[webhooks]]\nname = "bench"\nurl = "{hook_url}"\nevents = ["*"]\n'
            f'secret = "{SECRET}"\nconcurrency = {concurrency}\ntimeout = {timeout}\n'
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        db = self.tmp / f"host-{uuid.uuid4().hex[:6]}" / "state.db"
        argv = [sys.executable, "-m", "runtime", "up", "--headless", "--config", str(self.config), "--db", str(db)]
        argv += ["--bind", f"127.0.0.1:{free_port()}", "--workers", "1"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        sock = db.with_name(f"{db.name}.{proc.pid}.sock")
        wait(lambda: sock.exists() or proc.poll() is not None, 30, "a primary's control socket")
        if proc.poll() is not None:
            raise SystemExit(f"a primary exited with {proc.returncode}")
        return proc

    def wait_running(self, count: int) -> None:
        """Until `count` primaries write heartbeats: each has published the endpoint and polls the queue."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            query = "SELECT COUNT(*) FROM primaries"
            wait(lambda: conn.execute(query).fetchone()[0] >= count, 60, f"{count} primaries' heartbeats")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def backlog(url: str, events: int) -> None:
    """`events` events with one pending delivery each, committed in one transaction."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 1))
    with psycopg.connect(url) as conn:
        ids = [f"msg_bench_{uuid.uuid4().hex}" for _ in range(events)]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO webhook_events (id, type, payload, created_at) VALUES (%s, 'bench.event', '{}', %s)",
                [(event_id, stamp) for event_id in ids],
            )
            cur.executemany(
                "INSERT INTO webhook_deliveries (event_id, endpoint, attempt, status, next_attempt_at, created_at)"
                " VALUES (%s, 'bench', 0, 'pending', %s, %s)",
                [(event_id, stamp, stamp) for event_id in ids],
            )


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def deliveries_per_second(
    server: str, tmp: Path, primaries: int, events: int, hook_port: int
) -> tuple[float, float, float]:
    """Deliveries per second, and the CPU milliseconds per delivery of the primaries and of the server."""
    with database(server) as url:
        fleet = Primaries(tmp, url, f"http://127.0.0.1:{hook_port}/", concurrency=32)
        try:
            for _ in range(primaries):
                fleet.start()
            fleet.wait_running(primaries)
            backlog(url, events)
            ours = [psutil.Process(p.pid) for p in fleet.procs]
            server_procs = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
            cpu_ours, cpu_server = cpu_seconds(ours), cpu_seconds(server_procs)
            started = time.perf_counter()
            with psycopg.connect(url, autocommit=True) as conn:

                def delivered() -> bool:
                    query = "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'delivered'"
                    return conn.execute(query).fetchone()[0] >= events

                wait(delivered, 300, "every delivery", interval=0.02)
            elapsed = time.perf_counter() - started
            per = 1000 / events
            return (
                events / elapsed,
                (cpu_seconds(ours) - cpu_ours) * per,
                (cpu_seconds(server_procs) - cpu_server) * per,
            )
        finally:
            fleet.close()


def takeover(server: str, tmp: Path) -> tuple[float, int, float]:
    """(seconds from the kill to the last leased delivery sent by the survivor, how many, lease left at the kill)."""
    with database(server) as url, Receiver(SECRET, who=True) as rx:
        rx.answer("/slow", then=Answer(200, delay=0.5))
        fleet = Primaries(tmp, url, rx.url("/slow"), concurrency=4, timeout=1)
        try:
            doomed = fleet.start()
            fleet.wait_running(1)
            ids = [emit("bench.leased", {"n": n}, db=url) for n in range(200)]
            wait(lambda: len(rx.requests("/slow")) >= 6, 90, "the first primary delivering")
            survivor = fleet.start()
            # Running before the kill: one that starts after it frees a dead same-host primary's leases at once.
            fleet.wait_running(2)
            os.kill(doomed.pid, signal.SIGKILL)
            killed = time.monotonic()
            killed_wall = time.time()
            doomed.wait(10)
            with psycopg.connect(url) as conn:
                orphaned = dict(
                    conn.execute(
                        "SELECT event_id, lease_until FROM webhook_deliveries WHERE leased_by = %s"
                        " AND status IN ('pending', 'failed')",
                        (doomed.pid,),
                    ).fetchall()
                )

            def taken() -> bool:
                sent = {r.id for r in rx.requests("/slow") if r.sender_pid == survivor.pid}
                return set(orphaned) <= sent

            wait(taken, 90, "the survivor to send the dead primary's deliveries", interval=0.02)
            took = time.monotonic() - killed
            wait(lambda: set(ids) <= set(rx.ids("/slow")), 60, "every event")
            lease_end = max(datetime.fromisoformat(u.replace("Z", "+00:00")).timestamp() for u in orphaned.values())
            return took, len(orphaned), lease_end - killed_wall
        finally:
            fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=3000, help="backlog for the deliveries/s runs")
    parser.add_argument("--calls", type=int, default=2000, help="emit() and claim_slot() calls per backend")
    parser.add_argument("--skip-takeover", action="store_true", help="leave out the ~40 s takeover run")
    args = parser.parse_args()
    server = os.environ.get("CLUSTERCTL_TEST_PG_URL")
    if not server:
        raise SystemExit('no PostgreSQL: eval "$(tests/pg.sh start)" first, or set CLUSTERCTL_TEST_PG_URL')

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        sqlite_db = tmp / "state.db"
        with database(server) as url:
            for where in (str(sqlite_db), url):
                store = open_store_url(where)
                store.sync_endpoints([endpoint(9)])
                store.close()
            for label, where in (("SQLite", str(sqlite_db)), ("PostgreSQL", url)):
                time_emit(where, 50)  # connection, imports, prepared statements
                print(f"emit() to {label}: {percentiles(time_emit(where, args.calls))} ({args.calls} calls)")
            for label, where in (("SQLite", str(sqlite_db)), ("PostgreSQL", url)):
                print(f"slot claim on {label}: {percentiles(time_claims(where, args.calls))} ({args.calls} claims)")

        (tmp / "receiver.py").write_text(RECEIVER)
        hook_port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "receiver:app", "--port", str(hook_port), "--log-level", "warning"]
        receiver = subprocess.Popen([*argv, "--http", "httptools", "--loop", "uvloop", "--no-access-log"], cwd=tmp)
        try:
            wait(lambda: listening(hook_port), 20, "the receiver")
            for count in (1, 3):
                rate, ours, db = deliveries_per_second(server, tmp, count, args.events, hook_port)
                print(
                    f"deliveries with {count} primar{'y' if count == 1 else 'ies'}: {rate:.0f}/s ({args.events});"
                    f" CPU per delivery: primaries {ours:.2f} ms, PostgreSQL {db:.2f} ms"
                )
        finally:
            os.kill(receiver.pid, signal.SIGTERM)
            receiver.wait(30)

        if not args.skip_takeover:
            took, count, left = takeover(server, tmp)
            print(f"takeover of a killed primary's {count} leased deliveries: {took:.1f} s after the kill")
            print(f"  (its leases had {left:.1f} s left; lease = webhook timeout + 30 s)")


if __name__ == "__main__":
    # SIGTERM unwinds through the finally blocks that stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
