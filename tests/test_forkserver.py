"""The fork server with real processes: workers forked from it, its death, preload_app, new code, the primary's death.

Apps are written into the test's directory, so a test can change one and reload. Every wait is a poll
with a deadline; processes are ended by pid (the `start_cluster` fixture's clean-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import APPS, Cluster, get, pid_alive, port_free, wait_for

from runtime.config import ConfigError, load_settings

VERSIONED_APP = """
import json
import os
import threading

VERSION = {version!r}
IMPORTED_IN = os.getpid()
print("imported in", IMPORTED_IN, flush=True)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = {{
        "version": VERSION,
        "pid": os.getpid(),
        "imported_in": IMPORTED_IN,
        "worker": os.environ.get("CLUSTERCTL_WORKER_ID"),
        "threads": sorted(t.name for t in threading.enumerate()),
    }}
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": json.dumps(body).encode()}})
"""

# A thread started at import that takes a lock and allocates all the time: forked at a bad moment,
# a child would inherit the lock held and (with a careless fork) the allocator's too.
THREAD_AT_IMPORT = """
import threading
import time

LOCK = threading.Lock()


def _churn():
    while True:
        with LOCK:
            _junk = [bytearray(4096) for _ in range(64)]
        time.sleep(0.0005)


threading.Thread(target=_churn, name="started-at-import", daemon=True).start()
"""

BROKEN_APP = "raise RuntimeError('this generation does not import')\n"


def write_app(directory: Path, source: str) -> None:
    (directory / "forked_app.py").write_text(source)


def answer(cluster: Cluster, path: str = "/") -> dict[str, Any]:
    status, body = get(cluster.port, path)
    assert status == 200, body
    return json.loads(body)


def fork_server_of(cluster: Cluster) -> psutil.Process:
    """The primary's one fork server (its child running runtime.forkserver)."""

    def found() -> psutil.Process | None:
        # Its workers share its command line (forked, never exec'd), but not its environment.
        servers = [
            p
            for p in psutil.Process(cluster.proc.pid).children()
            if "runtime.forkserver" in p.cmdline() and "CLUSTERCTL_WORKER_ID" not in p.environ()
        ]
        return servers[0] if len(servers) == 1 else None

    return wait_for(found, 10, "exactly one fork server")


def forked(pid: int, server: psutil.Process) -> bool:
    """`pid` was forked from `server` (same command line, no exec) and is the primary's child, not the server's."""
    proc = psutil.Process(pid)
    return proc.cmdline() == server.cmdline() and proc.ppid() == server.ppid()


def start(start_cluster: Any, tmp_path: Path, *, preload: bool = False, **kwargs: Any) -> Cluster:
    config = kwargs.pop("config", "[server]\n") + ("preload_app = true\n" if preload else "")
    env = {"PYTHONPATH": f"{APPS}:{tmp_path}", "PYTHONDONTWRITEBYTECODE": "1"}
    return start_cluster(app="forked_app:app", config=config, env=env, **kwargs)


def test_workers_are_forked_by_the_fork_server_and_keep_their_promises(start_cluster, tmp_path):
    write_app(tmp_path, VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=2)
    server = fork_server_of(cluster)
    workers = {w["id"]: w["pid"] for w in cluster.wait_ready(2)}
    for pid in workers.values():
        assert forked(pid, server)
        proc = psutil.Process(pid)
        assert proc.ppid() == cluster.proc.pid  # the primary reaps it and its death signal names the primary
        assert os.getpgid(pid) == pid  # its own process group, as a fresh worker has
        env = proc.environ()
        assert env["CLUSTERCTL_INSTANCE_TYPE"] == "worker"
        assert env["CLUSTERCTL_PRIMARY_PID"] == str(cluster.proc.pid)
        assert env["CLUSTERCTL_WORKER_ID"] == str(next(slot for slot, p in workers.items() if p == pid))
    seen = {answer(cluster)["worker"] for _ in range(50)}
    assert seen == {"1", "2"}
    body = answer(cluster)
    assert body["imported_in"] == body["pid"]  # without preload_app each worker imports the app itself
    assert "forkserver.started" in cluster.output()
    log = cluster.db.parent / "logs" / "workers.log"
    for slot, pid in workers.items():  # each worker's output, through its own pipe, under its own slot and pid
        wait_for(lambda s=slot, p=pid: f"w{s}[{p}] out| imported in {p}" in log.read_text(), 5, f"worker {slot}'s line")


def test_a_killed_worker_is_replaced_from_the_fork_server(start_cluster, tmp_path):
    write_app(tmp_path, VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=1)
    server = fork_server_of(cluster)
    victim = cluster.wait_ready(1)[0]["pid"]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replacement = wait_for(lambda: answer(cluster)["pid"] != victim and answer(cluster)["pid"], 10, "a replacement")
    elapsed = time.monotonic() - killed_at
    assert forked(replacement, server)
    crashed = [e for e in cluster.worker_events() if e["event"] == "crashed"]
    assert crashed and crashed[0]["pid"] == victim and "SIGKILL" in crashed[0]["reason"]
    assert elapsed < 2.0, f"kill -9 → serving took {elapsed:.3f}s"  # tests/bench/respawn_forkserver.py measures it


def test_a_killed_fork_server_is_replaced_and_its_workers_serve_on(start_cluster, tmp_path):
    write_app(tmp_path, VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=2, preload=True)
    server = fork_server_of(cluster)
    before = {w["pid"] for w in cluster.wait_ready(2)}
    server.kill()
    wait_for(lambda: not pid_alive(server.pid), 5, "the fork server gone")
    for _ in range(20):
        assert answer(cluster)["pid"] in before
    assert {w["pid"] for w in cluster.wait_ready(2)} == before
    new_server = wait_for(
        lambda: fork_server_of(cluster).pid != server.pid and fork_server_of(cluster), 10, "a new one"
    )
    wait_for(lambda: "forkserver.died" in cluster.output(), 5, "its death reported")
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    cluster.seen_pids.add(victim)

    def replaced() -> set[int] | None:
        pids = {w["pid"] for w in cluster.wait_ready(2)}
        return pids if victim not in pids else None

    new = (wait_for(replaced, 10, "the killed worker replaced") - before).pop()
    assert forked(new, new_server)
    body = wait_for(lambda: (b := answer(cluster))["pid"] == new and b, 10, "an answer from the replacement")
    assert body["imported_in"] == new_server.pid  # preloaded by the new fork server


def test_preload_with_a_thread_started_at_import(start_cluster, tmp_path):
    write_app(tmp_path, THREAD_AT_IMPORT + VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=2, preload=True)
    server = fork_server_of(cluster)
    assert "app preloaded" in cluster.output()
    for _ in range(5):  # forks at random moments of the thread's churn: none may hang or crash
        victim = cluster.wait_ready(2)[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        cluster.seen_pids.add(victim)
        wait_for(lambda v=victim: v not in {w["pid"] for w in cluster.wait_ready(2)}, 10, "a replacement")
    bodies = [answer(cluster) for _ in range(20)]
    assert {b["imported_in"] for b in bodies} == {server.pid}  # imported once, in the fork server
    assert all("started-at-import" not in b["threads"] for b in bodies)  # a fork copies only its own thread
    assert server.num_threads() >= 2  # it runs on in the fork server
    assert not [e for e in cluster.worker_events() if e["event"] == "crashed" and "SIGKILL" not in (e["reason"] or "")]


def test_a_generation_whose_app_fails_to_import_rolls_back(start_cluster, tmp_path):
    write_app(tmp_path, VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=2, preload=True)
    before = {w["pid"] for w in cluster.wait_ready(2)}
    write_app(tmp_path, BROKEN_APP)
    result = cluster.cli("reload")
    assert result.returncode == 1, result
    assert "this generation does not import" in result.stderr
    assert "forkserver.unavailable" in cluster.output()  # and its workers were tried as fresh interpreters
    assert {w["pid"] for w in cluster.wait_ready(2)} == before
    assert {answer(cluster)["version"] for _ in range(10)} == {"one"}
    write_app(tmp_path, VERSIONED_APP.format(version="two, fixed"))
    result = cluster.cli("reload")
    assert result.returncode == 0, result.stderr
    assert {answer(cluster)["version"] for _ in range(10)} == {"two, fixed"}


def test_new_code_after_reload(start_cluster, tmp_path):
    for preload in (False, True):
        write_app(tmp_path, VERSIONED_APP.format(version="one"))
        cluster = start(start_cluster, tmp_path, workers=2, preload=preload, db=tmp_path / f"{preload}.db")
        old_server = fork_server_of(cluster)
        assert answer(cluster)["version"] == "one"
        write_app(tmp_path, VERSIONED_APP.format(version="two, after the reload"))
        result = cluster.cli("reload")
        assert result.returncode == 0, result.stderr
        workers = cluster.wait_ready(2)
        assert {w["generation"] for w in workers} == {2}
        assert {answer(cluster)["version"] for _ in range(20)} == {"two, after the reload"}
        new_server = fork_server_of(cluster)  # exactly one: the old generation's has been retired
        assert new_server.pid != old_server.pid
        assert all(forked(w["pid"], new_server) for w in workers)
        assert cluster.cli("stop").returncode == 0


def test_a_retired_fork_server_takes_no_draining_worker_with_it(start_cluster, tmp_path):
    cluster = start_cluster(workers=1, config="[server]\ngraceful_timeout = 30\n")
    old_server = fork_server_of(cluster)
    old = cluster.wait_ready(1)[0]["pid"]
    results: list[int] = []
    request = threading.Thread(target=lambda: results.append(get(cluster.port, "/sleep?8", 30)[0]))
    request.start()
    wait_for(lambda: cluster.status()["workers"][0]["in_flight"] == 1, 5, "the slow request in flight")
    reload: list[int] = []
    reloading = threading.Thread(target=lambda: reload.append(cluster.cli("reload").returncode))
    reloading.start()
    wait_for(lambda: not pid_alive(old_server.pid), 5, "the old generation's fork server retired")
    assert pid_alive(old) and not results, "the draining worker died with its fork server"
    request.join(30)
    reloading.join(30)
    assert results == [200] and reload == [0]
    ends = wait_for(
        lambda: [e for e in cluster.worker_events() if e["pid"] == old and e["exit_code"] is not None], 10, "its end"
    )
    assert [(e["event"], e["reason"]) for e in ends] == [("exited", "reload")]


def test_workers_and_fork_server_die_with_a_killed_primary(start_cluster, tmp_path):
    write_app(tmp_path, VERSIONED_APP.format(version="one"))
    cluster = start(start_cluster, tmp_path, workers=3, preload=True)
    server = fork_server_of(cluster)
    pids = [w["pid"] for w in cluster.wait_ready(3)]
    os.kill(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait(5)
    deadline = time.monotonic() + 1.0
    wait_for(lambda: not any(pid_alive(p) for p in [*pids, server.pid]), 1.0, "all gone within 1 s", interval=0.01)
    wait_for(lambda: port_free(cluster.port), max(0.05, deadline - time.monotonic()), "port free")


def test_preload_app_is_a_boolean_config_key(tmp_path):
    config = tmp_path / "clusterctl.toml"
    config.write_text("[server]\npreload_app = true\n")
    assert load_settings(config, {}, tmp_path).server.preload_app is True
    elsewhere = tmp_path / "no-config"
    elsewhere.mkdir()
    assert load_settings(None, {}, elsewhere).server.preload_app is False
    config.write_text('[server]\npreload_app = "yes"\n')
    with pytest.raises(ConfigError, match="preload_app"):
        load_settings(config, {}, tmp_path)


CLONED_CHILD = """
import os, signal, sys, threading
from runtime.forkserver import fork_sibling

heard = []
signal.signal(signal.SIGUSR1, lambda *_: heard.append("signal"))
if fork_sibling() == 0:
    # glibc's own fork() did not run: what it would have set up for the child must not matter.
    signal.raise_signal(signal.SIGUSR1)  # raise() finds this thread (its cached thread id is stale)
    thread = threading.Thread(target=heard.append, args=("thread",))
    thread.start()
    thread.join(5)
    print(os.getpid() != os.getppid() and heard == ["signal", "thread"], flush=True)
    os._exit(0)
"""


def test_a_cloned_child_raises_signals_at_itself_and_starts_threads(tmp_path):
    script = tmp_path / "cloned.py"
    script.write_text(CLONED_CHILD)
    # `; true` keeps sh from exec'ing python: the clone's parent is then sh, not this test process.
    result = subprocess.run(
        ["sh", "-c", f"{sys.executable} {script}; true"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.stdout.strip() == "True", result.stdout + result.stderr
