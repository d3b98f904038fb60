"""`reload` and SIGHUP re-read the config file first, like gunicorn's HUP (issue 11).

A real primary started with a config file and no `--workers` flag (flags override the file, so a flag
would pin the count); the file is edited between reloads, as an operator would.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import APPS, endpoints, free_port, get, wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

FIRST = """
[server]
workers = 2
timeout = 30

[[jobs]]
name = "old"
schedule = "* * * * * *"
command = ["true"]
"""

SECOND = """
[server]
workers = 3
timeout = 20
health_path = "/healthz"

[[jobs]]
name = "new"
schedule = "* * * * * *"
command = ["true"]

[[webhooks]]
name = "ops"
url = "http://127.0.0.1:9/hook"
events = ["app.*"]
secret = "env:RELOAD_HOOK_SECRET"
"""


def runs(db: Path, job: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM job_runs WHERE job = ? AND status != 'skipped'", (job,)).fetchone()[0]
    finally:
        conn.close()


def config_file(cluster) -> Path:
    return next(cluster.cwd.glob("clusterctl-*.toml"))


def test_reload_takes_the_edited_config_and_refuses_a_broken_one(start_cluster):
    cluster = start_cluster(workers=None, config=FIRST, env={"RELOAD_HOOK_SECRET": SECRET})
    assert cluster.status()["desired_workers"] == 2
    wait_for(lambda: runs(cluster.db, "old") >= 2, 10, "the old job running")

    config_file(cluster).write_text(SECOND)
    reload = cluster.cli("reload")
    assert reload.returncode == 0, reload.stderr
    for change in ("server.workers 2 -> 3", "server.timeout 30 -> 20", "job old removed", "job new added"):
        assert change in reload.stdout, reload.stdout
    assert "webhook ops added" in reload.stdout
    wait_for(lambda: cluster.settled(3), 30, "3 workers")
    status = cluster.status()
    assert status["generation"] == 2 and {job["name"] for job in status["jobs"]} == {"new"}
    wait_for(lambda: runs(cluster.db, "new") >= 2, 10, "the new job running")
    old_runs = runs(cluster.db, "old")
    wait_for(lambda: runs(cluster.db, "new") >= 5, 10, "a few more seconds of the new job")
    assert runs(cluster.db, "old") <= old_runs + 1  # at most the one slot in flight as it was removed
    assert endpoints(cluster.db) == {"ops": 1}

    config_file(cluster).write_text(SECOND + "\n[server.extra]\nworkres = 9\n")
    refused = cluster.cli("reload")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "reload refused" in refused.stderr and "nothing changed" in refused.stderr
    assert "Traceback" not in refused.stderr
    status = cluster.status()
    assert status["generation"] == 2 and status["desired_workers"] == 3

    scrape = free_port()
    config_file(cluster).write_text(SECOND + f'\n[metrics]\nbind = "127.0.0.1:{scrape}"\n')
    metrics = cluster.cli("reload")
    assert metrics.returncode == 0 and "metrics.bind" in metrics.stdout, metrics.stdout + metrics.stderr
    status, body = get(scrape, "/metrics")
    assert status == 200 and b"clusterctl_desired_workers 3" in body


def test_what_cannot_change_live_is_reported_and_kept(tmp_path):
    port, moved = free_port(), free_port()
    config = tmp_path / "clusterctl.toml"
    config.write_text(f'[app]\ntarget = "asgi_app:app"\n[server]\nbind = "127.0.0.1:{port}"\nworkers = 1\n')
    env = {**os.environ, "PYTHONPATH": str(APPS)}
    log = (tmp_path / "primary.log").open("wb")
    primary = subprocess.Popen(
        [sys.executable, "-m", "runtime", "up", "--headless"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        wait_for(lambda: get(port)[0] == 200, 30, "the primary serving")
        config.write_text(config.read_text().replace(str(port), str(moved)) + '[store]\npath = "elsewhere/state.db"\n')
        reload = subprocess.run(
            # The file names another store now: the running primary is found by the one it has.
            [sys.executable, "-m", "runtime", "reload", "--db", ".clusterctl/state.db"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reload.returncode == 0, reload.stderr
        assert f"bind 127.0.0.1:{port} -> 127.0.0.1:{moved}: not applied (restart the primary)" in reload.stdout
        assert "elsewhere/state.db: not applied" in reload.stdout
        assert get(port)[0] == 200
    finally:
        primary.kill()  # its workers die with it (PR_SET_PDEATHSIG)
        primary.wait(10)
        log.close()


def test_sighup_rereads_too_and_a_broken_file_changes_nothing(start_cluster):
    cluster = start_cluster(workers=None, config=FIRST)
    config_file(cluster).write_text(FIRST.replace("workers = 2", "workers = 1"))
    os.kill(cluster.proc.pid, signal.SIGHUP)
    wait_for(lambda: cluster.status()["generation"] == 2 and cluster.settled(1), 30, "the HUP's reload to 1 worker")

    config_file(cluster).write_text("[server\nworkers = 4\n")
    os.kill(cluster.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in cluster.output(), 10, "the refusal in the primary's log")
    assert cluster.proc.poll() is None
    status = cluster.status()
    assert status["generation"] == 2 and status["desired_workers"] == 1
