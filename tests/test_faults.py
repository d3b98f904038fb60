"""The fault suite (issue 6): real processes, real sockets, real SQLite, bounded for the default run.

1. Chaos: SIGKILL a random ready worker every 0.5-2 s under keep-alive load
   (`CLUSTERCTL_CHAOS_SECONDS`, default 20; 60 for the full run the issue describes).
2. SIGKILL of the primary under load with an every-second job and slow webhooks pending;
   then a restart on the same store: no orphan, no slot twice, no slot lost, no event lost.
3. The config loader fuzzed with hypothesis, in-process and through `check`.
4. A store that turns read-only or full under a running primary.
5. SIGKILL of processes in the middle of `emit()` transactions, then `PRAGMA integrity_check`.

Synchronisation is by polling with deadlines; the only sleeps pace the faults (kills, writes).
Tests end only the processes they started, by pid.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import APPS, Cluster, Load, endpoints, free_port, get, pid_alive, port_free, wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from receiver import Answer, Receiver

from runtime.config import KNOWN_KEYS, ConfigError, load_settings
from runtime.control import ControlError, request, socket_path
from runtime.store import Store

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# ---------------------------------------------------------------------------- helpers


def control(cluster: Cluster, cmd: str = "status", args: dict[str, Any] | None = None) -> Any:
    """Talk to the primary's control socket in-process (a CLI subprocess per poll is too slow for the chaos)."""
    try:
        return request(socket_path(cluster.db, cluster.proc.pid), cmd, args, timeout=5)
    except ControlError as exc:
        raise OSError(str(exc)) from None  # wait_for retries on OSError


def launch(
    tmp: Path,
    *,
    app: str = "asgi_app:app",
    workers: int = 2,
    config: str | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Any = None,
) -> Cluster:
    """Like the `start_cluster` fixture, for a module-scoped cluster or a primary with resource limits.

    The primary's output goes through a pipe to a file written by this process, so a file-size
    limit on the primary applies to the store and never to its own stderr.
    """
    port = free_port()
    db = tmp / "state.db"
    full_env = {**os.environ, "PYTHONPATH": str(APPS), **(env or {})}
    args = [sys.executable, "-m", "runtime", "up", "--headless", "--bind", f"127.0.0.1:{port}", "--db", str(db)]
    args += ["--app", app, "--workers", str(workers)]
    if config is not None:
        path = tmp / "clusterctl.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    log = tmp / "primary.log"
    proc = subprocess.Popen(
        args, cwd=tmp, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
    )

    def copy() -> None:
        assert proc.stdout is not None
        with log.open("ab") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()

    log.touch()
    threading.Thread(target=copy, daemon=True).start()
    cluster = Cluster(proc, port, db, tmp, log, full_env)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or len([w for w in control(cluster)["workers"] if w["state"] == "ready"]) == workers
            ),
            30,
            "cluster up",
        )
    except AssertionError:
        cluster.kill_everything()
        raise AssertionError(f"cluster did not start:\n{cluster.output()}") from None
    if proc.poll() is not None:
        raise AssertionError(f"primary exited with {proc.returncode}:\n{cluster.output()}")
    return cluster


def all_ready(cluster: Cluster, count: int) -> list[dict[str, Any]] | None:
    workers = control(cluster)["workers"]
    ready = [w for w in workers if w["state"] == "ready"]
    return ready if len(ready) == count == len(workers) else None


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def job_toml(name: str, schedule: str, command: list[str]) -> str:
    return (
        f"[[jobs]]\nname = {json.dumps(name)}\nschedule = {json.dumps(schedule)}\ncommand = {json.dumps(command)}\n\n"
    )


def hook_toml(name: str, url: str, **keys: Any) -> str:
    lines = [
        "[[webhooks]]",
        f"name = {json.dumps(name)}",
        f"url = {json.dumps(url)}",
        'events = ["app.*"]',
        'secret = "env:TEST_HOOK_SECRET"',
        *(f"{key} = {json.dumps(value)}" for key, value in keys.items()),
    ]
    return "\n".join(lines) + "\n\n"


def job_runs(db: Path, job: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM job_runs WHERE job = ? ORDER BY scheduled_for, id"
        return [dict(r) for r in conn.execute(query, (job,))]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def slot_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def read_lines(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def chattr(flag: str, *paths: Path) -> bool:
    result = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)
    return result.returncode == 0


# ---------------------------------------------------------------------------- 1. chaos

CHAOS_SECONDS = float(os.environ.get("CLUSTERCTL_CHAOS_SECONDS", "20"))
CHAOS_SEED = int(os.environ.get("CLUSTERCTL_CHAOS_SEED", "6"))
CHAOS_WORKERS = 4
CHAOS_CLIENTS = 8


@dataclass
class Kill:
    slot: int
    pid: int
    at: float  # time.monotonic() of the SIGKILL
    recovered_in: float | None = None  # seconds until N ready workers again (None: not within 30 s)
    backoff: bool = False  # the slot showed state "backoff" on the way
    failed_before: int = 0  # the load's failure count just before the kill
    failed: int = 0  # failed requests between this kill and the next
    respawned_after: float | None = None  # from the `crashed` row to the replacement's `spawned` row (store clock)
    booted_in: float | None = None  # from the replacement's `spawned` row to its `ready` row


@dataclass
class ChaosRun:
    boot: float  # a worker's import/boot time, measured before the first kill (see measure_boot)
    kills: list[Kill] = field(default_factory=list)
    requests_ok: int = 0
    failures: list[str] = field(default_factory=list)
    primary_alive: bool = False
    crashed: list[dict[str, Any]] = field(default_factory=list)
    output: str = ""

    @property
    def bound(self) -> float:
        return 1.0 + self.boot

    def figures(self) -> str:
        times = [k.recovered_in for k in self.kills if k.recovered_in is not None]
        worst = max(times, default=float("nan"))
        plain = max((k.recovered_in or math.inf for k in self.kills if not k.backoff), default=float("nan"))
        per_kill = len(self.failures) / max(1, len(self.kills))
        return (
            f"{len(self.kills)} kills in {CHAOS_SECONDS:g}s (seed {CHAOS_SEED}), boot {self.boot:.2f}s, "
            f"bound {self.bound:.2f}s, worst recovery {worst:.2f}s ({plain:.2f}s without back-off), "
            f"{sum(k.backoff for k in self.kills)} kills hit the crash-loop back-off, "
            f"{len(self.failures)} failed / {self.requests_ok} ok requests ({per_kill:.2f} failures per kill, "
            f"at most {max((k.failed for k in self.kills), default=0)}); "
            "kills (slot, seconds to recover = respawn after + boot, back-off, failed): "
            + ", ".join(
                f"({k.slot}, {k.recovered_in or math.inf:.2f} = {_s(k.respawned_after)} + {_s(k.booted_in)}, "
                f"{'B' if k.backoff else '-'}, {k.failed})"
                for k in self.kills
            )
        )


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}"


def measure_boot(cluster: Cluster) -> float:
    """A worker's import/boot time: the worst of the first workers' spawn → ready (from the store) and of
    two fresh interpreters importing the worker and the app under the load."""
    times = []
    events = cluster.worker_events()
    for ready in (e for e in events if e["event"] == "ready"):
        spawned = next(e for e in events if e["event"] == "spawned" and e["pid"] == ready["pid"])
        times.append((slot_time(ready["ts"]) - slot_time(spawned["ts"])).total_seconds())
    for _ in range(2):
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import runtime.worker, asgi_app"], cwd=cluster.cwd, env=cluster.env, check=True
        )
        times.append(time.monotonic() - started)
    return max(times)


def recover(cluster: Cluster, kill: Kill, limit: float = 30.0) -> None:
    """Poll (20 ms) until the cluster has N ready workers again, none of them the victim."""
    while time.monotonic() - kill.at < limit:
        workers = control(cluster)["workers"]
        kill.backoff = kill.backoff or any(w["id"] == kill.slot and w["state"] == "backoff" for w in workers)
        ready = [w for w in workers if w["state"] == "ready" and w["pid"] != kill.pid]
        if len(ready) == len(workers) == CHAOS_WORKERS:
            kill.recovered_in = time.monotonic() - kill.at
            return
        time.sleep(0.02)


def timings(kills: list[Kill], events: list[dict[str, Any]]) -> None:
    """Split each recovery, from the store's own timestamps: crash → respawn (back-off) and spawn → ready (boot)."""
    ts = {id(e): slot_time(e["ts"]) for e in events}
    for kill in kills:
        crashed = next((e for e in events if e["event"] == "crashed" and e["pid"] == kill.pid), None)
        if crashed is None:
            continue
        spawned = next(
            (e for e in events if e["event"] == "spawned" and e["worker_id"] == kill.slot and e["id"] > crashed["id"]),
            None,
        )
        if spawned is None:
            continue
        kill.respawned_after = (ts[id(spawned)] - ts[id(crashed)]).total_seconds()
        ready = next((e for e in events if e["event"] == "ready" and e["pid"] == spawned["pid"]), None)
        if ready is not None:
            kill.booted_in = (ts[id(ready)] - ts[id(spawned)]).total_seconds()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRun]:
    """One chaos window shared by the tests below: kills every 0.5-2 s (seeded), never before the last recovered."""
    cluster = launch(tmp_path_factory.mktemp("chaos"), workers=CHAOS_WORKERS)
    try:
        rng = random.Random(CHAOS_SEED)
        with Load(cluster.port, clients=CHAOS_CLIENTS) as load:
            load.wait_requests(200)
            run = ChaosRun(boot=measure_boot(cluster))
            end = time.monotonic() + CHAOS_SECONDS
            next_kill = time.monotonic()
            while time.monotonic() < end:
                time.sleep(max(0.0, next_kill - time.monotonic()))  # pacing, not synchronisation
                ready = sorted((w for w in control(cluster)["workers"] if w["state"] == "ready"), key=lambda w: w["id"])
                victim = rng.choice(ready)
                os.kill(victim["pid"], signal.SIGKILL)
                kill = Kill(victim["id"], victim["pid"], time.monotonic(), failed_before=len(load.failures))
                cluster.seen_pids.add(victim["pid"])
                run.kills.append(kill)
                recover(cluster, kill)
                if kill.recovered_in is None:
                    break
                next_kill = max(kill.at + rng.uniform(0.5, 2.0), time.monotonic())
            load.wait_requests(50, timeout=10)  # still serving after the last kill
        run.requests_ok = load.ok
        run.failures = list(load.failures)
        for kill, following in zip(run.kills, run.kills[1:] + [None], strict=True):
            kill.failed = (following.failed_before if following else len(run.failures)) - kill.failed_before
        run.primary_alive = cluster.proc.poll() is None
        killed = {k.pid for k in run.kills}

        def crashed_rows() -> list[dict[str, Any]]:
            rows = [e for e in cluster.worker_events() if e["event"] == "crashed"]
            return rows if killed <= {e["pid"] for e in rows} else []

        run.crashed = wait_for(crashed_rows, 10, "a crashed row for every kill")
        timings(run.kills, cluster.worker_events())
        run.output = cluster.output()
    finally:
        cluster.kill_everything()  # before the other tests run: the window's figures are all kept in `run`
    yield run


def test_chaos_kills_lose_only_the_requests_in_flight(chaos: ChaosRun) -> None:
    figures = chaos.figures()
    print(figures)
    assert chaos.kills, figures
    assert all(k.recovered_in is not None for k in chaos.kills), f"a kill never recovered within 30s: {figures}"
    assert chaos.primary_alive, chaos.output
    # Keep-alive clients: a killed worker can fail at most the one request of each client connected to it.
    assert len(chaos.failures) <= len(chaos.kills) * CHAOS_CLIENTS, (figures, Counter(chaos.failures).most_common(5))
    assert all(k.failed <= CHAOS_CLIENTS for k in chaos.kills), figures
    # Exactly one `crashed` row per kill, naming the signal, and no crash that was not a kill.
    per_pid = Counter(e["pid"] for e in chaos.crashed)
    assert per_pid == Counter(k.pid for k in chaos.kills), chaos.crashed
    slots = {k.pid: k.slot for k in chaos.kills}
    for row in chaos.crashed:
        assert row["worker_id"] == slots[row["pid"]] and "SIGKILL" in row["reason"], row
    # Respawning itself is quick: a kill that did not trip the crash-loop back-off recovers within the bound.
    # The replacement's own boot (spawn → ready, from the store) stands in when the load made it slower
    # than the boot measured up front: the supervisor's part (notice, respawn, count it ready) is what is held to 1 s.
    slow = [
        (k.slot, round(k.recovered_in or math.inf, 2))
        for k in chaos.kills
        if not k.backoff and (k.recovered_in or math.inf) > 1.0 + max(chaos.boot, k.booted_in or 0.0)
    ]
    assert not slow, f"recoveries without back-off over 1 s + boot: {slow}; {figures}"


def test_chaos_every_kill_recovers_within_one_second_plus_import_time(chaos: ChaosRun) -> None:
    late = [
        (k.slot, k.pid, round(k.recovered_in or math.inf, 2))
        for k in chaos.kills
        if (k.recovered_in or math.inf) > 1.0 + max(chaos.boot, k.booted_in or 0.0)
    ]
    assert not late, f"{len(late)} kills took longer than 1 s + boot: {late}; {chaos.figures()}"


# ---------------------------------------------------------------------------- 2. kill -9 of the primary


def test_kill_9_primary_under_load_loses_no_slot_and_no_event(start_cluster, tmp_path):
    out = tmp_path / "ticks.txt"
    tick = sh(f'echo "$CLUSTERCTL_SCHEDULED_FOR $$" >> {shlex.quote(str(out))}; sleep 0.5')
    with Receiver(SECRET) as rx:
        rx.answer("/slow", then=Answer(200, delay=1.0))
        config = job_toml("tick", "* * * * * *", tick) + hook_toml("slow", rx.url("/slow"), concurrency=4, timeout=10)
        env = {"TEST_HOOK_SECRET": SECRET}
        cluster = start_cluster(app="emit_app:app", workers=2, config=config, env=env)
        survivors: set[int] = set()
        try:
            with Load(cluster.port, clients=4) as load:
                load.wait_requests(100)
                wait_for(lambda: len(read_lines(out)) >= 2, 10, "two runs of the job")
                code, body = get(cluster.port, "/emit?type=app.pending&n=12")
                assert code == 200, body
                ids = json.loads(body)["ids"]
                workers = {w["pid"] for w in control(cluster)["workers"]}
                wait_for(lambda: len(rx.requests("/slow")) > 4, 10, "a second batch of deliveries in flight")
                wait_for(
                    lambda: any(pid_alive(int(line[1])) for line in read_lines(out)[-1:]), 5, "a job process running"
                )
                family = {c.pid for c in psutil.Process(cluster.proc.pid).children(recursive=True)}
                running = {pid for pid in family if pid not in workers}  # the job launcher, jobs and their children
                os.kill(cluster.proc.pid, signal.SIGKILL)
                killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
                jobs = {int(line[1]) for line in read_lines(out)}
                survivors = workers | family | jobs

                def all_gone() -> bool:
                    return not any(pid_alive(pid) for pid in survivors) and port_free(cluster.port)

                wait_for(all_gone, 1.0, "every worker and job process gone and the port free", interval=0.01)
                elapsed = time.monotonic() - killed_at
            cluster.proc.wait(5)
            assert elapsed <= 1.0
            assert len(set(rx.ids("/slow"))) < len(ids), "the test meant to kill the primary with events pending"
            # Stay down long enough for slots to be missed, so the restart has catch-up to record.
            wait_for(lambda: time.monotonic() - killed_at >= 2.0, 5, "2 s without a primary", interval=0.05)

            again = start_cluster(
                app="emit_app:app", workers=2, config=config, env=env, db=cluster.db, port=cluster.port
            )
            wait_for(lambda: set(ids) <= set(rx.ids("/slow")), 20, "every event delivered after the restart")
            up = datetime.now(UTC)

            def settled() -> bool:
                rows = job_runs(cluster.db, "tick")
                after = [r for r in rows if r["trigger"] == "schedule" and slot_time(r["scheduled_for"]) > up]
                return any(r["status"] == "succeeded" for r in after)

            wait_for(settled, 10, "a scheduled run after the restart")
            stopped = again.cli("stop")
            assert stopped.returncode == 0, stopped.stderr
        finally:
            for pid in survivors:  # orphans, if the assertion above failed: ours by their environment
                try:
                    proc = psutil.Process(pid)
                    if proc.environ().get("CLUSTERCTL_PRIMARY_PID") == str(cluster.proc.pid):
                        proc.kill()
                except psutil.Error:
                    pass

        # Events: every id emitted before the kill arrived, correctly signed (duplicates allowed: at least once).
        requests = rx.requests("/slow")
        assert set(ids) <= {r.id for r in requests}
        assert all(r.signature_ok for r in requests)

    # Jobs: one row per slot, every slot from the first to the last, none run twice.
    rows = job_runs(cluster.db, "tick")
    slots = [r["scheduled_for"] for r in rows]
    assert len(slots) == len(set(slots)), Counter(slots).most_common(3)
    first, last = slot_time(slots[0]), slot_time(slots[-1])
    expected = {first + timedelta(seconds=i) for i in range(int((last - first).total_seconds()) + 1)}
    missing = sorted(expected - {slot_time(s) for s in slots})
    assert not missing, f"slots with no job_runs row: {missing}"
    ran = Counter(line[0] for line in read_lines(out))
    assert max(ran.values()) == 1, f"a slot ran twice: {ran.most_common(3)}"
    by_slot = {r["scheduled_for"]: r for r in rows}
    for slot in ran:
        assert slot in by_slot, f"{slot} ran with no job_runs row"
    for row in rows:
        assert row["status"] in {"succeeded", "skipped", "abandoned"}, row
        if row["status"] == "succeeded":
            assert row["scheduled_for"] in ran, f"{row} succeeded but never wrote its line"
        if row["status"] == "skipped":
            assert row["scheduled_for"] not in ran, row
    # The slots missed while no primary ran are there, as catch-up runs or skipped rows.
    caught = [r for r in rows if r["trigger"] == "catch_up"]
    assert len(caught) >= 1, rows
    for row in caught:
        assert killed_wall - timedelta(seconds=1) < slot_time(row["scheduled_for"]) <= up, row
    twice = sum(1 for n in Counter(r.id for r in requests).values() if n > 1)
    print(
        f"after kill -9: {len(workers)} workers and {len(running)} other processes gone and "
        f"the port free in {elapsed:.2f}s; {len(rows)} slots: {dict(Counter(r['status'] for r in rows))}, "
        f"{len(caught)} caught up ({dict(Counter(r['status'] for r in caught))}); "
        f"{len(ids)} events, {twice} delivered twice"
    )


# ---------------------------------------------------------------------------- 3. config fuzzing

APP_KEYS, SERVER_KEYS, STORE_KEYS, JOB_KEYS, WEBHOOK_KEYS = (
    tuple(sorted(KNOWN_KEYS[section])) for section in ("app", "server", "store", "jobs", "webhooks")
)

# Values a key accepts, and values that are nearly right for it: a fuzzing dictionary, so that documents get
# past the first check and the faults land everywhere in the loader, not only in its first section.
INTEGER_KEYS = {
    "max_requests",
    "max_requests_jitter",
    "max_memory_mb",
    "reload_batch",
    "keep_runs",
    "retries",
    "max_attempts",
    "concurrency",
}
VALID: dict[str, list[Any]] = {
    "target": ["asgi_app:app", "a.b:c.d"],
    "interface": ["auto", "asgi", "wsgi"],
    "before_start": [["true"], ["python", "-c", "pass"], "echo hi"],
    "bind": ["127.0.0.1:8000", "unix:/tmp/x.sock", "[::1]:8000", "localhost:0"],
    "workers": ["auto", 1, 3, "2"],
    "health_path": ["/healthz", "/"],
    "path": ["state.db", "sub/dir/state.db", "~/state.db"],
    "schedule": ["* * * * *", "* * * * * *", "*/5 * * * *", "30 1 * * 1-5", "0 0 29 2 *"],
    "timezone": ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"],
    "command": [["true"], "echo hi"],
    "call": ["job_funcs:write_env", "a.b:c"],
    "http": [{"url": "http://127.0.0.1:1/"}, {"url": "http://h/x", "method": "POST", "headers": {}, "body": ""}],
    "overlap": ["skip", "allow", "replace"],
    "catch_up": ["none", "latest", "all"],
    "url": ["http://127.0.0.1:9/x", "https://h"],
    "events": [["*"], ["app.*", "job.failed"]],
    "secret": ["env:X", SECRET, "file:/nonexistent"],
}
NEARLY: dict[str, list[Any]] = {
    "target": ["nocolon", ":app", "mod:", "1mod:app", "mod:a b", ""],
    "interface": ["ASGI", "", "both"],
    "before_start": [[], [1], [""], ""],
    "bind": ["unix:", ":80", "h:99999", "h:-1", "a/b:1", "h:", "127.0.0.1", "[::1]"],
    "workers": ["0", "-1", "x", "", 0, -3, 2.0, "1.5", "auto ", True, "\u0663", "\u00b2"],  # Arabic 3, superscript 2
    "health_path": ["healthz", ""],
    "path": ["", "~no_such_user_fuzz/state.db"],
    "name": ["", "a b", "ü", "a\nb"],
    "schedule": ["61 * * * *", "@daily", "", "a b c d e", "* * * *", "* * * * * * *", "*/0 * * * *", "5-1 * * * *"],
    "timezone": ["Nope/Zone", "", "../etc/passwd", "/etc/passwd", "utc", "Europe/", "America", "x" * 300],
    "command": [[], [1, 2], ""],
    "call": ["nocolon", "", "a:b:c"],
    "http": [{"url": 3}, "http://x", {}, {"method": "POST"}],
    "overlap": ["SKIP", "", "never"],
    "catch_up": ["some", "", "None"],
    "url": ["ftp://x", "", "127.0.0.1:9"],
    "events": [[], ["app.*", ""], "app.*", [1]],
    "secret": ["", 5, ["env:X"]],
}
NUMBERS = st.one_of(
    st.integers(-5, 100),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.text(max_size=12))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
RARELY = st.sampled_from([False] * 9 + [True])  # not st.integers(0, 9) == 0: hypothesis favours 0
UNKNOWN_KEYS = st.one_of(st.sampled_from(["workerz", "Workers", "extra", "", " name", "ü"]), st.text(max_size=8))


def toml_key(key: str) -> str:
    return toml_string(key)


def toml_string(text: str) -> str:
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def valid_value(key: str) -> st.SearchStrategy[Any]:
    if key in VALID:
        return st.sampled_from(VALID[key])
    return st.integers(1, 100) if key in INTEGER_KEYS else st.integers(1, 100) | st.floats(1, 1000)


def any_value(key: str) -> st.SearchStrategy[Any]:
    """Mostly nearly-right values for the key, sometimes anything at all."""
    nearly = st.sampled_from(NEARLY[key]) if key in NEARLY else st.integers(-5, 0) | st.floats(-10, 0.4)
    return st.one_of(nearly, nearly, valid_value(key), VALUES)


@st.composite
def valid_table(draw: st.DrawFn, kind: str, index: int) -> dict[str, Any]:
    """A table the loader accepts: the required keys of its kind, and some optional ones."""
    known = {"app": APP_KEYS, "server": SERVER_KEYS, "store": STORE_KEYS, "jobs": JOB_KEYS, "webhooks": WEBHOOK_KEYS}
    table: dict[str, Any] = {}
    optional = [k for k in known[kind] if k not in ("name", "schedule", "url", "command", "call", "http")]
    if kind == "jobs":
        table = {"name": f"job{index}", "schedule": draw(valid_value("schedule"))}
        action = draw(st.sampled_from(["command", "call", "http"]))
        table[action] = draw(valid_value(action))
    elif kind == "webhooks":
        table = {"name": f"hook{index}", "url": draw(valid_value("url"))}
    for key in draw(st.lists(st.sampled_from(optional), max_size=len(optional), unique=True)):
        table[key] = draw(valid_value(key))
    return table


@st.composite
def wild_table(draw: st.DrawFn, kind: str, index: int) -> dict[str, Any]:
    """A table of its kind's keys with any values, sometimes with an unknown key."""
    known = {"app": APP_KEYS, "server": SERVER_KEYS, "store": STORE_KEYS, "jobs": JOB_KEYS, "webhooks": WEBHOOK_KEYS}
    table: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(known[kind]), max_size=len(known[kind]), unique=True)):
        table[key] = draw(any_value(key))
    if draw(RARELY):
        table[draw(UNKNOWN_KEYS)] = draw(VALUES)
    return table


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A TOML config: either a valid one with at most one fault in it, or one with anything anywhere."""
    wild = draw(st.booleans())
    make = wild_table if wild else valid_table
    top: dict[str, Any] = {}
    tables: list[tuple[str, dict[str, Any]]] = []  # (header, table) in document order
    for name in ("app", "server", "store"):
        if draw(st.sampled_from([True, True, True, False])):
            tables.append((f"[{name}]", draw(make(name, 0))))
    for name in ("jobs", "webhooks"):
        for index in range(draw(st.integers(0, 3))):
            tables.append((f"[[{name}]]", draw(make(name, index))))
    if not wild and tables and draw(st.sampled_from([True, True, True, False])):
        header, table = tables[draw(st.integers(0, len(tables) - 1))]
        kind = header.strip("[]")
        fault = draw(st.sampled_from(["value", "value", "value", "unknown key", "drop a key", "not a table"]))
        if fault == "value":
            known = {"app": APP_KEYS, "server": SERVER_KEYS, "store": STORE_KEYS}.get(kind)
            key = draw(st.sampled_from(known or (JOB_KEYS if kind == "jobs" else WEBHOOK_KEYS)))
            table[key] = draw(any_value(key))
        elif fault == "unknown key":
            table[draw(UNKNOWN_KEYS)] = draw(VALUES)
        elif fault == "drop a key" and table:
            table.pop(draw(st.sampled_from(sorted(table))))
        elif fault == "not a table":
            tables = [(h, t) for h, t in tables if h.strip("[]") != kind]
            top[kind] = draw(VALUES)
    if wild and draw(RARELY):
        top[draw(UNKNOWN_KEYS)] = draw(VALUES)
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in top.items()]
    for header, table in tables:
        lines.append(header)
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=documents())
def test_fuzzed_configs_load_or_raise_config_error(tmp_path: Path, document: str) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(document, encoding="utf-8")
    try:
        load_settings(path, cwd=tmp_path)
        event("accepted")
    except ConfigError as exc:
        message = str(exc)
        assert message, document
        assert "\n" not in message, f"a message of more than one line: {message!r}\nfor the config:\n{document}"
        event("refused")
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\nfor the config:\n{document}") from exc


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents())
def test_fuzzed_configs_through_check_exit_0_or_2(tmp_path: Path, document: str) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(document, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "check", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode in (0, 2), f"exit {result.returncode}\n{output}\nfor the config:\n{document}"
    assert "Traceback" not in output, f"{output}\nfor the config:\n{document}"


JOB = '[[jobs]]\nname = "a"\nschedule = "* * * * *"\ncommand = ["true"]\n'


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(
            JOB + 'timezone = "America"\n',
            id="timezone-is-a-directory",
        ),
        pytest.param(
            JOB + f'timezone = "{"a" * 300}"\n',
            id="timezone-too-long",
        ),
        pytest.param(
            '[server]\nworkers = "²"\n',
            id="workers-superscript-digit",
        ),
        pytest.param(
            '[store]\npath = "~no_such_user_clusterctl/state.db"\n',
            id="store-path-unknown-user",
        ),
    ],
)
def test_loader_crashes_found_by_fuzzing(tmp_path: Path, document: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(document)
    with pytest.raises(ConfigError):
        load_settings(path, cwd=tmp_path)


def test_an_error_about_a_job_with_a_newline_in_its_name_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "name.toml"
    path.write_text('[[jobs]]\nname = "a\\nb"\nschedule = "bad"\ncommand = ["true"]\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(path, cwd=tmp_path)
    assert "\n" not in str(refused.value), repr(str(refused.value))


def test_up_refuses_a_store_path_with_a_nul_byte(tmp_path: Path) -> None:
    path = tmp_path / "nul.toml"
    path.write_text('[store]\npath = "state\\u0000.db"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    env["PYTHONPATH"] = str(APPS)
    port = free_port()
    argv = ["up", "--headless", "--config", str(path), "--app", "asgi_app:app", "--workers", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "runtime", *argv, "--bind", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stderr


# ---------------------------------------------------------------------------- 4. store trouble


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths a test made immutable (chattr +i: even root cannot write them); always made writable again."""
    probe = tmp_path / "chattr-probe"
    probe.touch()
    if not shutil.which("chattr") or not chattr("+i", probe):
        pytest.skip("chattr +i is not available here: no way to make a read-only store without mount")
    chattr("-i", probe)
    paths: list[Path] = []
    yield paths
    chattr("-i", *[p for p in paths if p.exists()])


def test_a_read_only_store_directory_is_refused_at_start(tmp_path: Path, immutable: list[Path]) -> None:
    store_dir = tmp_path / "ro"
    store_dir.mkdir()
    assert chattr("+i", store_dir)
    immutable.append(store_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    env["PYTHONPATH"] = str(APPS)
    argv = ["up", "--headless", "--app", "asgi_app:app", "--workers", "1", "--db", str(store_dir / "state.db")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime", *argv, "--bind", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=60)
    output = stdout + stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in stderr.splitlines() if line.startswith("clusterctl-tui: error:")]
    assert len(errors) == 1 and str(store_dir / "state.db") in errors[0], output
    assert port_free(port)
    assert not _processes_of(proc.pid), "a worker outlived the primary that refused to start"


def _processes_of(primary_pid: int) -> list[psutil.Process]:
    """Live processes started for this primary (workers, jobs), found by their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CLUSTERCTL_PRIMARY_PID") == str(primary_pid) and proc.status() != "zombie":
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _store_error(cluster: Cluster) -> str | None:
    return control(cluster).get("store_error")


def _still_serving(cluster: Cluster) -> None:
    for _ in range(20):
        code, _body = get(cluster.port)
        assert code == 200


def test_store_turning_read_only_under_a_running_primary(tmp_path: Path, immutable: list[Path]) -> None:
    config = job_toml("tick", "* * * * * *", ["true"])
    cluster = launch(tmp_path, app="emit_app:app", workers=2, config=config)
    try:
        wait_for(lambda: job_runs(cluster.db, "tick"), 10, "a first job run")
        # The db and its WAL, not the -shm: SQLite maps that one, and writes to an immutable mapping are SIGBUS.
        files = [cluster.db, cluster.db.with_name(cluster.db.name + "-wal")]
        assert chattr("+i", *files)
        immutable.extend(files)
        control(cluster, "scale", {"count": 3})
        wait_for(lambda: all_ready(cluster, 3), 15, "3 ready workers with a read-only store")
        error = wait_for(lambda: _store_error(cluster), 10, "status to report the store error")
        assert str(cluster.db) in error, error
        _still_serving(cluster)
        status_cli = cluster.cli("status", "--json")
        assert status_cli.returncode == 0 and json.loads(status_cli.stdout)["store_error"], status_cli.stderr
        control(cluster, "scale", {"count": 2})
        wait_for(lambda: all_ready(cluster, 2), 15, "scaled back down with a read-only store")
        assert cluster.proc.poll() is None, cluster.output()

        assert chattr("-i", *files)
        wait_for(lambda: _store_error(cluster) is None, 10, "the store error to clear once writable again")
        seen = len(job_runs(cluster.db, "tick"))
        wait_for(lambda: len(job_runs(cluster.db, "tick")) > seen, 10, "job runs recorded again")
        _still_serving(cluster)
        assert "supervisor error" not in cluster.output()
    finally:
        chattr("-i", *immutable)
        cluster.kill_everything()


def test_store_full_under_a_running_primary(tmp_path: Path) -> None:
    """A full disk, without mount: RLIMIT_FSIZE on the primary (and so its workers) with SIGXFSZ ignored.

    The limit sits above what the store needs to open (its WAL is ~140 kB after the schema is created),
    so writes start failing soon after, with EFBIG.
    """
    limit = 256 * 1024

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    config = job_toml("tick", "* * * * * *", ["true"])
    cluster = launch(tmp_path, app="emit_app:app", workers=2, config=config, preexec_fn=limited)
    try:
        for n in range(6):  # events the primary must record: scaling, worker spawns and exits, job runs
            control(cluster, "scale", {"count": 3 if n % 2 == 0 else 2})
            wait_for(lambda n=n: all_ready(cluster, 3 if n % 2 == 0 else 2), 15, "scaled with a full store")
            if _store_error(cluster):
                break
        error = wait_for(lambda: _store_error(cluster), 15, "status to report the store error")
        assert str(cluster.db) in error, error
        sizes = {p.name: p.stat().st_size for p in tmp_path.glob("state.db*") if p.is_file()}
        assert max(sizes.values()) >= limit - 64 * 1024, sizes  # the limit, not something else, is what failed
        _still_serving(cluster)
        status_cli = cluster.cli("status", "--json")
        assert status_cli.returncode == 0, status_cli.stderr
        assert str(cluster.db) in json.loads(status_cli.stdout)["store_error"]
        control(cluster, "scale", {"count": 3})
        wait_for(lambda: all_ready(cluster, 3), 15, "still scaling with a full store")
        assert cluster.proc.poll() is None, cluster.output()
        assert "supervisor error" not in cluster.output()
    finally:
        cluster.kill_everything()


# ---------------------------------------------------------------------------- 5. SIGKILL during SQLite writes

EMITTER = """
import sys
from runtime import emit

db = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    print(emit("app.fault", {"i": i, "pad": "x" * 3000}, db=db), flush=True)
    i += 1
"""


def test_sigkill_during_emit_leaves_no_half_written_event(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = Store(db)
    endpoints = [{"name": n, "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 1} for n in "ab"]
    store.sync_endpoints(endpoints)
    store.close()
    script = tmp_path / "emitter.py"
    script.write_text(EMITTER)
    rng = random.Random(5)
    printed: set[str] = set()
    for _round in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(db)], cwd=tmp_path, stdout=subprocess.PIPE, text=True, bufsize=1
            )
            for _ in range(2)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.3, 0.7))  # let them write; the kill lands wherever it lands
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            for proc in procs:
                rest, _ = proc.communicate(timeout=10)
                assert proc.returncode == -signal.SIGKILL
                printed.update(line for line in rest.splitlines() if re.fullmatch(r"msg_[0-9a-f]{28}", line))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        events = {row[0] for row in conn.execute("SELECT id FROM webhook_events")}
        half = conn.execute(
            "SELECT e.id, COUNT(d.id) FROM webhook_events e LEFT JOIN webhook_deliveries d ON d.event_id = e.id"
            " GROUP BY e.id HAVING COUNT(d.id) != 2"
        ).fetchall()
        orphans = conn.execute(
            "SELECT COUNT(*) FROM webhook_deliveries d LEFT JOIN webhook_events e ON e.id = d.event_id WHERE e.id IS NULL"
        ).fetchone()[0]
    finally:
        conn.close()
    assert len(printed) > 100, "the emitters hardly wrote anything before the kills"
    assert half == [], f"events without their two deliveries: {half[:5]}"
    assert orphans == 0
    assert printed <= events, f"{len(printed - events)} ids emit() returned are not in the store"
    # The store is still usable through the normal path.
    store = Store(db)
    try:
        store.emit("msg_after_the_kills", "app.fault", "{}", ["a", "b"])
    finally:
        store.close()


# ---------------------------------------------------------------------------- found on the way: scale-down race

SLOW_IMPORT_APP = """
import os
import time

from asgi_app import app  # noqa: F401

if os.environ.get("CLUSTERCTL_WORKER_ID") == "2":
    time.sleep(1.0)  # slot 2 is still importing when the scale-down arrives
"""


def test_a_worker_scaled_down_while_starting_exits_promptly(start_cluster, tmp_path: Path) -> None:
    (tmp_path / "slow_import_app.py").write_text(SLOW_IMPORT_APP)
    cluster = start_cluster(app="slow_import_app:app", workers=1, env={"PYTHONPATH": f"{APPS}:{tmp_path}"})
    control(cluster, "scale", {"count": 2})
    starting = wait_for(
        lambda: [w for w in control(cluster)["workers"] if w["id"] == 2 and w["pid"]], 5, "slot 2 spawned"
    )[0]
    cluster.seen_pids.add(starting["pid"])
    assert starting["state"] == "starting", starting
    control(cluster, "scale", {"count": 1})
    wait_for(lambda: not pid_alive(starting["pid"]), 3, f"worker {starting['pid']} to exit after the scale-down")


# ---------------------------------------------------------------------------- 6. a hostile tester's findings


def test_a_refused_second_up_touches_nothing_the_running_primary_shares(start_cluster, tmp_path: Path) -> None:
    config = hook_toml("ops", "http://127.0.0.1:9/hook")
    cluster = start_cluster(app="emit_app:app", config=config, env={"TEST_HOOK_SECRET": SECRET})
    wait_for(lambda: endpoints(cluster.db) == {"ops": 1}, 10, "the endpoint published")
    elsewhere = tmp_path / "no-config-here"
    elsewhere.mkdir()
    # The mistake: the same port and store, from a directory with no config (so the demo webhook).
    second = subprocess.run(
        [sys.executable, "-m", "runtime", "up", "--headless", "--bind", f"127.0.0.1:{cluster.port}"]
        + ["--db", str(cluster.db)],
        cwd=elsewhere,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stderr
    assert "address already in use" in second.stderr.lower() or "in use" in second.stderr, second.stderr
    assert endpoints(cluster.db) == {"ops": 1}
    status, body = get(cluster.port, "/emit?type=app.after")
    assert status == 200
    event_id = json.loads(body)["ids"][0]
    conn = sqlite3.connect(cluster.db)
    try:
        targets = conn.execute("SELECT endpoint FROM webhook_deliveries WHERE event_id = ?", (event_id,)).fetchall()
    finally:
        conn.close()
    assert targets == [("ops",)]


def test_before_start_python_is_the_workers_interpreter(start_cluster, tmp_path: Path) -> None:
    marker = tmp_path / "before_start.txt"
    script = f"import sys; open({str(marker)!r}, 'w').write(sys.executable)"
    config = f"[app]\nbefore_start = {json.dumps(['python', '-c', script])}\n"
    # No venv on PATH, as under systemd or a bare ssh session: `python` must still be ours.
    start_cluster(config=config, env={"PATH": "/nonexistent"})
    assert marker.read_text() == sys.executable


def test_a_failed_before_start_says_so_and_no_more(start_cluster) -> None:
    config = f"[app]\nbefore_start = {json.dumps(['python', '-c', 'raise SystemExit(4)'])}\n"
    cluster = start_cluster(config=config, wait=False)
    assert cluster.proc.wait(30) == 2
    output = cluster.output()
    assert "failed with exit code 4" in output and "no worker started" in output
    assert "draining" not in output


def test_a_stalled_primary_kills_no_healthy_worker(start_cluster) -> None:
    cluster = start_cluster(config="[server]\ntimeout = 2\n")
    before = {w["pid"] for w in cluster.wait_ready(2)}
    os.kill(cluster.proc.pid, signal.SIGSTOP)
    try:
        # A stall longer than `timeout`, measured, not slept through for synchronisation.
        wait_for(lambda: psutil.Process(cluster.proc.pid).status() == psutil.STATUS_STOPPED, 5, "the stop")
        stalled_at = time.monotonic()
        wait_for(lambda: time.monotonic() - stalled_at > 4, 10, "a stall twice the heartbeat timeout", interval=0.2)
    finally:
        os.kill(cluster.proc.pid, signal.SIGCONT)
    # Long enough after the stall for a wrongful hang-kill to have happened and shown up.
    resumed = time.monotonic()
    wait_for(lambda: time.monotonic() - resumed > 3 and cluster.status(), 10, "3 s of supervision after the stall")
    assert {w["pid"] for w in cluster.wait_ready(2)} == before
    assert not [e for e in cluster.worker_events() if e["event"] in ("killed", "crashed")]


def test_env_secrets_reach_no_worker_and_no_job(start_cluster) -> None:
    secret_name = "TEST_HOOK_SECRET"
    config = hook_toml("ops", "http://127.0.0.1:9/hook") + job_toml("printenv", "* * * * *", ["env"])
    cluster = start_cluster(config=config, env={secret_name: SECRET})
    for worker in cluster.wait_ready(2):
        assert secret_name not in psutil.Process(worker["pid"]).environ()
    status, body = get(cluster.port, "/env")
    assert status == 200 and SECRET not in body.decode()
    assert cluster.cli("run-job", "printenv", "--wait").returncode == 0
    (run,) = job_runs(cluster.db, "printenv")
    assert "CLUSTERCTL_JOB=printenv" in run["output"]  # the job did print its environment
    assert SECRET not in run["output"] and secret_name not in run["output"]


@pytest.mark.parametrize("count", [10_000, 1e9, float("inf"), "3", True])
def test_scale_over_the_control_socket_is_bounded(start_cluster, count: Any) -> None:
    cluster = start_cluster(workers=1)
    with pytest.raises(ControlError):
        request(socket_path(cluster.db, cluster.proc.pid), "scale", {"count": count}, timeout=5)
    with pytest.raises(ControlError, match="at most 256"):
        request(socket_path(cluster.db, cluster.proc.pid), "scale", {"delta": 300}, timeout=5)
    assert control(cluster)["desired_workers"] == 1


def test_a_workers_grandchildren_end_with_it(start_cluster) -> None:
    cluster = start_cluster(app="hostile_app:app", workers=1)
    status, body = get(cluster.port, "/fork")
    grandchild = json.loads(body)["grandchild"]
    assert status == 200 and pid_alive(grandchild)
    stop = cluster.cli("stop")
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: not pid_alive(grandchild), 5, "the grandchild to end with its worker")
    assert port_free(cluster.port)


def test_a_worker_killed_before_it_serves_backs_off(start_cluster, tmp_path: Path) -> None:
    """What an app that outgrows memory while importing looks like: SIGKILLed from outside, again and again."""
    oom = tmp_path / "oom"
    cluster = start_cluster(app="hostile_app:app", workers=1, env={"HOSTILE_KILL_AT_IMPORT": str(oom)})
    oom.touch()
    os.kill(cluster.ready_workers()[0]["pid"], signal.SIGKILL)
    wait_for(lambda: any(w["state"] == "backoff" for w in control(cluster)["workers"]), 20, "a back-off")
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 4, 10, "4 s of the crash loop", interval=0.2)
    spawns = [e for e in cluster.worker_events() if e["event"] == "spawned"]
    # Back-off doubles from 0.5 s: a hot loop would have spawned dozens by now.
    assert len(spawns) <= 8, len(spawns)


def test_signals_during_a_slow_start_up(start_cluster) -> None:
    env = {"HOSTILE_IMPORT_SECONDS": "3"}
    cluster = start_cluster(app="hostile_app:app", workers=1, env=env, wait=False)
    wait_for(lambda: control(cluster) is not None, 20, "the control socket (workers still importing)")
    os.kill(cluster.proc.pid, signal.SIGHUP)  # `systemctl reload` during a deploy
    wait_for(lambda: all_ready(cluster, 1), 30, "the worker ready despite the HUP")
    assert cluster.proc.poll() is None

    second = start_cluster(app="hostile_app:app", workers=1, env=env, wait=False, db=cluster.db.with_name("b.db"))
    wait_for(lambda: control(second) is not None, 20, "the second primary's control socket")
    worker = wait_for(lambda: psutil.Process(second.proc.pid).children(), 10, "a worker importing")[0]
    os.kill(second.proc.pid, signal.SIGTERM)
    assert second.proc.wait(10) == 0, second.output()
    assert not pid_alive(worker.pid)
    assert "Traceback" not in second.output()


def test_stop_during_a_reload_answers_the_reload(start_cluster) -> None:
    cluster = start_cluster(app="hostile_app:app", workers=1, env={"HOSTILE_IMPORT_SECONDS": "2"})
    reload = subprocess.Popen(
        [sys.executable, "-m", "runtime", "reload", "--db", str(cluster.db)],
        cwd=cluster.cwd,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(control(cluster)["workers"]) == 2, 10, "the reload's new worker starting")
        assert cluster.cli("stop").returncode == 0
        out, err = reload.communicate(timeout=20)
    finally:
        if reload.poll() is None:
            reload.kill()
    assert reload.returncode == 1, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert "Traceback" not in cluster.output()


def test_a_flooding_worker_keeps_the_primary_small_and_the_site_up(start_cluster) -> None:
    cluster = start_cluster(app="flood_app:app", workers=2)
    primary = psutil.Process(cluster.proc.pid)
    peak = 0
    started = time.monotonic()
    while time.monotonic() - started < 8:  # pacing: sample memory and serve requests through the flood
        peak = max(peak, primary.memory_info().rss)
        assert get(cluster.port)[0] == 200
        time.sleep(0.2)
    # Unbounded, this grew by about 50 MB a second (1.4 GB in 30 s); bounded, it stays near its start size.
    assert peak < 200 * 1024 * 1024, f"primary peaked at {peak / 1048576:.0f} MiB"
    log = cluster.db.parent / "logs" / "workers.log"
    wait_for(lambda: "lines dropped" in log.read_text(errors="replace"), 10, "the dropped lines counted in the log")
    assert cluster.proc.poll() is None


def test_a_flooding_neighbour_does_not_delay_a_respawn(start_cluster) -> None:
    """Every worker writes flat out; one is killed: its replacement is ready as fast as a quiet cluster's."""
    cluster = start_cluster(app="flood_app:app", workers=2)
    victim = cluster.ready_workers()[0]
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    cluster.seen_pids.add(victim["pid"])
    wait_for(
        lambda: len([w for w in all_ready(cluster, 2) or [] if w["pid"] != victim["pid"]]) == 2,
        10,
        "the replacement ready",
        interval=0.02,
    )
    recovered = time.monotonic() - killed_at
    events = cluster.worker_events()
    spawned = next(
        e for e in events if e["event"] == "spawned" and e["worker_id"] == victim["id"] and e["pid"] != victim["pid"]
    )
    ready = next(e for e in events if e["event"] == "ready" and e["pid"] == spawned["pid"])
    boot = (slot_time(ready["ts"]) - slot_time(spawned["ts"])).total_seconds()
    # The supervisor's part (notice the death, spawn, count it ready) stays within 1 s on top of the boot.
    assert recovered < 1.0 + boot, f"recovered in {recovered:.2f}s with a boot of {boot:.2f}s"
