"""Cron jobs on the primary, end to end: real primaries, real job processes, real SQLite.

Every test reads `job_runs` straight from the store and compares it with what
the jobs themselves wrote to files in tmp_path. Schedules are 6-field
every-second expressions (`* * * * * *`, seconds first) so slots come quickly.
Synchronisation is by polling with deadlines; the only sleeps let time pass to
observe that something does NOT happen.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, pid_alive, wait_for

EVERY_SECOND = "* * * * * *"
NEVER_SOON = "0 0 1 1 *"  # midnight on 1 January: only manual runs in a test


# ---------------------------------------------------------------- helpers


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def job_toml(name: str, schedule: str = EVERY_SECOND, **keys: Any) -> str:
    lines = ["[[jobs]]", f"name = {toml_value(name)}", f"schedule = {toml_value(schedule)}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n\n"


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def q(path: Path) -> str:
    return shlex.quote(str(path))


def runs(db: Path, job: str | None = None) -> list[dict[str, Any]]:
    """job_runs rows, oldest slot first."""
    conn = sqlite3.connect(db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        where, params = ("WHERE job = ?", (job,)) if job else ("", ())
        return [dict(r) for r in conn.execute(f"SELECT * FROM job_runs {where} ORDER BY scheduled_for, id", params)]
    except sqlite3.OperationalError:  # the primary has not created the table yet
        return []
    finally:
        conn.close()


def attempts(db: Path, run_id: int) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM job_attempts WHERE run_id = ? ORDER BY id", (run_id,))]
    finally:
        conn.close()


def read_lines(path: Path) -> list[list[str]]:
    """The lines a job appended, split on whitespace ([] before the first run)."""
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def slot_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def utc_now() -> datetime:
    return datetime.now(UTC)


def finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "running"]


def assert_no_gap(rows: list[dict[str, Any]]) -> None:
    """Every second from the first slot to the last has exactly one row (an every-second job)."""
    slots = [slot_time(r["scheduled_for"]) for r in rows if r["trigger"] != "manual"]
    assert slots, "no rows"
    expected = int((slots[-1] - slots[0]).total_seconds()) + 1
    assert len(slots) == len(set(slots)) == expected, [r["scheduled_for"] for r in rows]


def socket_of(cluster: Any) -> Path:
    return cluster.db.with_name(f"{cluster.db.name}.{cluster.proc.pid}.sock")


def stop(cluster: Any, *extra: str) -> None:
    result = cluster.cli("stop", *extra)
    assert result.returncode == 0, result.stdout + result.stderr


def bare_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no primary and no inherited CLUSTERCTL_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def leftovers():
    """PIDs of job processes a test saw; any still alive at the end (orphans) are killed."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "CLUSTERCTL_JOB" in proc.environ():
                proc.kill()
        except psutil.Error:
            pass


def note_family(pids: set[int], pid: int) -> None:
    pids.add(pid)
    try:
        pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        pass


# ---------------------------------------------------------------- exactly once


def test_two_primaries_on_one_store_run_each_slot_exactly_once(start_cluster, tmp_path):
    out = tmp_path / "ticks.txt"
    fields = "$CLUSTERCTL_SCHEDULED_FOR $CLUSTERCTL_PRIMARY_PID $CLUSTERCTL_INSTANCE_TYPE $CLUSTERCTL_JOB"
    config = job_toml("tick", command=sh(f'echo "{fields}" >> {q(out)}'))
    db = tmp_path / "shared.db"
    first = start_cluster(config=config, workers=1, db=db)
    second = start_cluster(config=config, workers=1, db=db, wait=False)
    wait_for(lambda: second.proc.poll() is not None or "cluster.started" in second.output(), 30, "second primary up")
    assert second.proc.poll() is None, second.output()
    both_up = utc_now()

    wait_for(
        lambda: len([line for line in read_lines(out) if slot_time(line[0]) > both_up]) >= 5,
        20,
        "5 slots with both primaries up",
    )
    for cluster in (first, second):  # two live primaries: each is addressed by its own socket
        stop(cluster, "--socket", str(socket_of(cluster)))

    lines = read_lines(out)
    rows = runs(db, "tick")
    by_slot = {r["scheduled_for"]: r for r in rows}
    counts = Counter(line[0] for line in lines)
    assert max(counts.values()) == 1, f"a slot ran twice: {counts.most_common(3)}"
    assert len(by_slot) == len(rows), "two rows for one slot"
    pids = {first.proc.pid, second.proc.pid}
    for slot, pid, instance_type, job in lines:
        assert instance_type == "primary"
        assert job == "tick"
        assert int(pid) in pids
        assert slot in by_slot, f"ran {slot} with no job_runs row"
        assert by_slot[slot]["primary_pid"] == int(pid), "the slot was run by a primary that did not claim it"
    ran = {line[0] for line in lines}
    for row in rows:
        if row["status"] == "succeeded":
            assert row["scheduled_for"] in ran, f"row {row} succeeded but the job never wrote its line"
    assert len([r for r in rows if r["status"] == "succeeded" and slot_time(r["scheduled_for"]) > both_up]) >= 5
    assert_no_gap(rows)  # no slot lost between the two primaries either


# ---------------------------------------------------------------- primary death and restart


def test_kill_9_primary_ends_its_running_job_and_restart_marks_it_abandoned(start_cluster, tmp_path, leftovers):
    pids = tmp_path / "job.pids"
    config = job_toml("long", command=sh(f'echo "$$ $CLUSTERCTL_SCHEDULED_FOR" >> {q(pids)}; sleep 60'))
    cluster = start_cluster(config=config, workers=1)
    pid_text, slot = wait_for(lambda: read_lines(pids) and read_lines(pids)[0], 10, "the job to start")
    pid = int(pid_text)
    # sh forks its `sleep 60`: note that child too, so the test cleans it up if it is orphaned.
    wait_for(lambda: psutil.Process(pid).children(), 5, "the job's sleep to start")
    note_family(leftovers, pid)
    wait_for(lambda: [r for r in runs(cluster.db, "long") if r["status"] == "running"], 5, "a running row")
    assert pid_alive(pid)

    cluster.proc.kill()
    cluster.proc.wait(10)
    wait_for(lambda: not pid_alive(pid), 5, f"job process {pid} to die with its primary")

    restarted = start_cluster(config=config, workers=1, db=cluster.db)

    def abandoned():
        row = next(r for r in runs(cluster.db, "long") if r["scheduled_for"] == slot)
        return row if row["status"] == "abandoned" else None

    row = wait_for(abandoned, 10, "the orphaned run to be marked abandoned")
    assert row["primary_pid"] == cluster.proc.pid
    assert row["finished_at"]
    assert row["trigger"] == "schedule"
    assert [line for line in read_lines(pids) if line[1] == slot] == [[pid_text, slot]]
    others = [r for r in runs(cluster.db, "long") if r["scheduled_for"] != slot]
    assert all(r["status"] != "abandoned" for r in others), others
    for line in read_lines(pids):
        note_family(leftovers, int(line[0]))
    stop(restarted)  # a graceful stop ends the new primary's job (and its whole group)


def test_job_children_die_with_a_killed_primary(start_cluster, tmp_path, leftovers):
    kids = tmp_path / "kids.txt"
    config = job_toml("parent", command=sh(f'sleep 60 & echo "$$ $!" >> {q(kids)}; wait'))
    cluster = start_cluster(config=config, workers=1)
    job_pid, child_pid = (int(p) for p in wait_for(lambda: read_lines(kids) and read_lines(kids)[0], 10, "a child"))
    leftovers.update({job_pid, child_pid})
    assert pid_alive(child_pid)
    cluster.proc.kill()
    cluster.proc.wait(10)
    wait_for(lambda: not pid_alive(job_pid), 5, "the job's own process to die")
    wait_for(lambda: not pid_alive(child_pid), 2, f"the job's child {child_pid} to die with the primary")


def test_restart_catch_up_policies(start_cluster, tmp_path):
    """catch_up none / latest / all, side by side: one stop, one gap of at least 3 slots, one restart."""
    policies = ("none", "latest", "all")
    files = {p: tmp_path / f"catch-{p}.txt" for p in policies}
    config = "".join(
        job_toml(f"catch-{p}", command=sh(f'echo "$CLUSTERCTL_SCHEDULED_FOR" >> {q(files[p])}'), catch_up=p)
        for p in policies
    )
    first = start_cluster(config=config, workers=1)
    wait_for(lambda: all(read_lines(f) for f in files.values()), 10, "every job to run once")
    stop(first)
    stopped = time.time()
    wait_for(lambda: time.time() >= stopped + 3.0, 5, "3 slots to pass with no primary", interval=0.1)

    second = start_cluster(config=config, workers=1, db=first.db)

    def settled() -> bool:
        for p in policies:
            rows = runs(second.db, f"catch-{p}")
            caught = [r for r in rows if r["trigger"] == "catch_up"]
            if not caught or any(r["status"] == "running" for r in caught):
                return False
            after = [r for r in rows if r["trigger"] == "schedule" and r["scheduled_for"] > caught[-1]["scheduled_for"]]
            if not finished(after):
                return False
        return True

    wait_for(settled, 15, "catch-up done and a scheduled run after it")
    stop(second)

    for p in policies:
        rows = runs(second.db, f"catch-{p}")
        ran = Counter(line[0] for line in read_lines(files[p]))
        assert max(ran.values()) == 1, f"{p}: a slot ran twice: {ran}"
        caught = [r for r in rows if r["trigger"] == "catch_up"]
        assert len(caught) >= 3, f"{p}: expected >= 3 missed slots, got {caught}"
        assert_no_gap(rows)
        for row in rows:
            if row["status"] == "succeeded":
                assert row["scheduled_for"] in ran, f"{p}: {row} succeeded but wrote nothing"
            if row["status"] == "skipped":
                assert row["scheduled_for"] not in ran, f"{p}: {row} skipped but the job ran"
        skipped = [r for r in caught if r["status"] == "skipped"]
        done = [r for r in caught if r["status"] != "skipped"]
        for row in skipped:
            assert "catch_up" in row["output"], f"{p}: a skipped row must say why: {row}"
        if p == "none":
            assert done == [], done
        elif p == "latest":
            assert [r["scheduled_for"] for r in done] == [caught[-1]["scheduled_for"]], caught
            assert done[0]["status"] == "succeeded"
            assert len(skipped) == len(caught) - 1
        else:
            assert skipped == []
            assert all(r["status"] == "succeeded" for r in caught), caught
            assert {r["scheduled_for"] for r in caught} <= set(ran)


# ---------------------------------------------------------------- overlap and timeout


def test_overlap_policies(start_cluster, tmp_path, leftovers):
    """A 2.5 s job every second under skip / replace / allow, side by side."""
    policies = ("skip", "replace", "allow")
    files = {p: tmp_path / f"overlap-{p}.txt" for p in policies}

    def script(path: Path) -> list[str]:
        line = "$(date +%s.%N) $CLUSTERCTL_SCHEDULED_FOR $$"
        return sh(f'echo "start {line}" >> {q(path)}; sleep 2.5; echo "end {line}" >> {q(path)}')

    config = "".join(job_toml(f"overlap-{p}", command=script(files[p]), overlap=p) for p in policies)
    cluster = start_cluster(config=config, workers=1)

    def count(p: str, status: str, text: str = "") -> int:
        return sum(1 for r in runs(cluster.db, f"overlap-{p}") if r["status"] == status and text in r["output"])

    wait_for(
        lambda: (
            count("skip", "succeeded") >= 1
            and count("skip", "skipped") >= 2
            and count("replace", "failed", "replaced") >= 2
            and count("allow", "succeeded") >= 2
        ),
        20,
        "each overlap policy to show itself",
    )
    for p in policies:
        for line in read_lines(files[p]):
            leftovers.add(int(line[3]))
    stop(cluster)

    def max_concurrent(lines: list[list[str]]) -> int:
        open_runs = peak = 0
        for line in lines:
            open_runs += 1 if line[0] == "start" else -1
            peak = max(peak, open_runs)
        return peak

    # skip: never two at once, and the slots that found one running are recorded as skipped, saying why.
    lines = read_lines(files["skip"])
    assert max_concurrent(lines) == 1, lines
    starts = {line[2]: float(line[1]) for line in lines if line[0] == "start"}
    ends = {line[2]: float(line[1]) for line in lines if line[0] == "end"}
    order = sorted(starts, key=starts.get)
    for previous, following in zip(order, order[1:], strict=False):
        assert starts[following] >= ends[previous], f"{following} started before {previous} ended"
    started = set(starts)
    rows = runs(cluster.db, "overlap-skip")
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) >= 2
    for row in skipped:
        assert "still running" in row["output"] and "overlap = skip" in row["output"], row
        assert row["scheduled_for"] not in started
    for row in rows:
        if row["status"] == "succeeded":
            assert row["scheduled_for"] in started

    # replace: each new slot ends the previous run, which is recorded as failed ("replaced").
    lines = read_lines(files["replace"])
    ended = {line[2] for line in lines if line[0] == "end"}
    replaced = [r for r in runs(cluster.db, "overlap-replace") if "replaced" in r["output"]]
    assert len(replaced) >= 2
    slots = [r["scheduled_for"] for r in runs(cluster.db, "overlap-replace")]
    for row in replaced:
        assert row["status"] == "failed", row
        assert row["scheduled_for"] in {line[2] for line in lines if line[0] == "start"}
        assert row["scheduled_for"] not in ended, "a replaced run finished anyway"
        following = slots[slots.index(row["scheduled_for"]) + 1]
        assert following in row["output"], f"should name the run that replaced it: {row}"

    # allow: runs overlap (a second start before the first end), and each finishes.
    lines = read_lines(files["allow"])
    assert max_concurrent(lines) >= 2, lines
    done = [r for r in runs(cluster.db, "overlap-allow") if r["status"] == "succeeded"]
    assert len(done) >= 2
    assert {r["scheduled_for"] for r in done} <= {line[2] for line in lines if line[0] == "end"}


def test_timeout_kills_the_whole_process_group(start_cluster, tmp_path, leftovers):
    kids = tmp_path / "kids.txt"
    config = job_toml(
        "slow", timeout=1, command=sh(f'sleep 100 & echo "$CLUSTERCTL_SCHEDULED_FOR $!" >> {q(kids)}; wait')
    )
    cluster = start_cluster(config=config, workers=1)
    row = wait_for(
        lambda: next((r for r in runs(cluster.db, "slow") if r["status"] == "timed_out"), None), 10, "a timed_out run"
    )
    children = {slot: int(pid) for slot, pid in read_lines(kids)}
    leftovers.update(children.values())
    assert row["scheduled_for"] in children, "the job wrote no child pid for its slot"
    child = children[row["scheduled_for"]]
    wait_for(lambda: not pid_alive(child), 3, f"the backgrounded child {child} to be killed")
    assert "timed out" in row["output"]
    started, ended = slot_time(row["started_at"]), slot_time(row["finished_at"])
    assert timedelta(seconds=0.9) <= ended - started < timedelta(seconds=5), row
    stop(cluster)


# ---------------------------------------------------------------- manual runs, retries, history


def test_manual_runs_retries_and_history_without_a_primary(start_cluster, tmp_path):
    counter, log = tmp_path / "count", tmp_path / "attempts.txt"
    flaky = sh(
        f"n=$(cat {q(counter)} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {q(counter)}; "
        f'echo "$n $CLUSTERCTL_SCHEDULED_FOR $CLUSTERCTL_JOB" >> {q(log)}; echo "attempt $n"; [ $n -ge 2 ]'
    )
    broken = sh(f'echo "1 $CLUSTERCTL_SCHEDULED_FOR $CLUSTERCTL_JOB" >> {q(log)}; echo broken on purpose; exit 3')
    config = job_toml("flaky", NEVER_SOON, command=flaky, retries=2) + job_toml("broken", NEVER_SOON, command=broken)
    cluster = start_cluster(config=config, workers=1)

    result = cluster.cli("run-job", "flaky", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in result.stdout
    result = cluster.cli("run-job", "broken", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout

    (run,) = runs(cluster.db, "flaky")
    assert (run["trigger"], run["status"], run["attempt"], run["exit_code"]) == ("manual", "succeeded", 2, 0)
    assert "attempt 2" in run["output"]
    tries = attempts(cluster.db, run["id"])
    assert [(a["attempt"], a["status"], a["exit_code"]) for a in tries] == [(1, "failed", 1), (2, "succeeded", 0)]
    assert "attempt 1" in tries[0]["output"]
    (bad,) = runs(cluster.db, "broken")
    assert (bad["trigger"], bad["status"], bad["attempt"], bad["exit_code"]) == ("manual", "failed", 1, 3)
    assert "broken on purpose" in bad["output"]
    assert read_lines(log) == [
        ["1", run["scheduled_for"], "flaky"],
        ["2", run["scheduled_for"], "flaky"],  # a retry is an attempt of the same slot
        ["1", bad["scheduled_for"], "broken"],
    ]

    stop(cluster)
    history = cluster.cli("history", "--json", "--job", "flaky")
    assert history.returncode == 0, history.stderr
    listed = json.loads(history.stdout)
    assert [(h["id"], h["job"], h["status"], h["trigger"], h["attempt"]) for h in listed] == [
        (run["id"], "flaky", "succeeded", "manual", 2)
    ]
    text = cluster.cli("history")
    assert text.returncode == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        (str(bad["id"]), "broken", "manual", "failed"),
        (str(run["id"]), "flaky", "manual", "succeeded"),
    ]
    failed_only = json.loads(cluster.cli("history", "--json", "--status", "failed").stdout)
    assert [h["id"] for h in failed_only] == [bad["id"]]


def test_history_with_no_store_is_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "state.db"
    line = one_error_line(bare_cli(tmp_path, "history", "--db", str(missing)))
    assert str(missing) in line
    assert not missing.exists(), "history must not create a store"


def test_pause_persists_across_a_restart(start_cluster, tmp_path):
    out = tmp_path / "ticks.txt"
    config = job_toml("tick", command=sh(f'echo "$CLUSTERCTL_SCHEDULED_FOR" >> {q(out)}'))
    cluster = start_cluster(config=config, workers=1)
    wait_for(lambda: read_lines(out), 10, "a first run")

    result = cluster.cli("pause-job", "tick")
    assert result.returncode == 0, result.stderr
    paused_at = utc_now()  # the pause is in effect once the command returns

    def after_pause() -> tuple[list[dict[str, Any]], list[str]]:
        rows = [r for r in runs(cluster.db, "tick") if slot_time(r["scheduled_for"]) > paused_at]
        lines = [line[0] for line in read_lines(out) if slot_time(line[0]) > paused_at]
        return rows, lines

    time.sleep(2.0)  # observe: two slots pass while paused
    assert after_pause() == ([], [])

    stop(cluster)
    restarted = start_cluster(config=config, workers=1, db=cluster.db)
    (job,) = restarted.status()["jobs"]
    assert job["name"] == "tick" and job["paused"] is True, job
    time.sleep(1.0)  # observe: another slot passes
    rows, lines = after_pause()
    assert lines == [], "a paused job ran after a restart"
    # Slots missed while down are recorded, as skipped; nothing was scheduled.
    assert all(r["status"] == "skipped" and r["trigger"] == "catch_up" for r in rows), rows

    result = restarted.cli("resume-job", "tick")
    assert result.returncode == 0, result.stderr
    resumed_at = utc_now()
    (job,) = restarted.status()["jobs"]
    assert job["paused"] is False

    def ran_again():
        return [
            r
            for r in runs(cluster.db, "tick")
            if r["trigger"] == "schedule" and r["status"] == "succeeded" and slot_time(r["scheduled_for"]) > resumed_at
        ]

    new = wait_for(ran_again, 10, "a scheduled run after resume")
    assert new[0]["scheduled_for"] in {line[0] for line in read_lines(out)}


# ---------------------------------------------------------------- call and http jobs, status, events


def test_call_jobs_run_functions_in_a_child_interpreter(start_cluster, tmp_path):
    out = tmp_path / "calls.jsonl"
    config = (
        job_toml("call-sync", call="job_funcs:write_env")
        + job_toml("call-async", call="job_funcs:write_env_async")
        + job_toml("call-boom", call="job_funcs:explode")
    )
    cluster = start_cluster(config=config, workers=1, env={"JOB_OUT": str(out)})

    def done():
        got = {job: finished(runs(cluster.db, job)) for job in ("call-sync", "call-async", "call-boom")}
        return got if all(got.values()) else None

    got = wait_for(done, 15, "a finished run of each call job")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    primary = str(cluster.proc.pid)
    for job, kind, result in (("call-sync", "sync", "sync done"), ("call-async", "async", "async done")):
        row = got[job][0]
        assert row["status"] == "succeeded" and row["exit_code"] == 0, row
        assert result in row["output"]
        mine = [r for r in records if r["CLUSTERCTL_JOB"] == job]
        assert row["scheduled_for"] in {r["CLUSTERCTL_SCHEDULED_FOR"] for r in mine}
        for record in mine:
            assert record["kind"] == kind
            assert record["CLUSTERCTL_INSTANCE_TYPE"] == "primary"
            assert record["CLUSTERCTL_PRIMARY_PID"] == primary
            assert record["pid"] != cluster.proc.pid  # a child interpreter, not the primary
    row = got["call-boom"][0]
    assert row["status"] == "failed" and row["exit_code"] not in (None, 0), row
    assert "Traceback" in row["output"]
    assert "RuntimeError: boom on purpose" in row["output"]
    assert "explode" in row["output"]
    assert row["scheduled_for"] in {r["CLUSTERCTL_SCHEDULED_FOR"] for r in records if r["kind"] == "explode"}


def test_http_jobs_status_and_outcome_events(start_cluster, tmp_path):
    port, closed = free_port(), free_port()
    config = (
        job_toml("http-ok", http={"url": f"http://127.0.0.1:{port}/", "method": "GET"})
        + job_toml("http-closed", http={"url": f"http://127.0.0.1:{closed}/", "method": "GET"}, timeout=5)
        + job_toml("later", NEVER_SOON, command=["true"])
    )
    cluster = start_cluster(config=config, workers=1, port=port)

    def done():
        got = {job: finished(runs(cluster.db, job)) for job in ("http-ok", "http-closed")}
        return got if all(got.values()) else None

    got = wait_for(done, 15, "a finished run of each http job")
    ok, bad = got["http-ok"][0], got["http-closed"][0]
    assert ok["status"] == "succeeded" and ok["exit_code"] == 200, ok
    body = json.loads(ok["output"].split("\n", 1)[1])  # what the app answered, kept as the job's output
    worker_pids = {w["pid"] for w in cluster.status()["workers"]}
    assert body["pid"] in worker_pids and body["worker"] == "1"
    assert bad["status"] == "failed", bad
    assert f"127.0.0.1:{closed}" in bad["output"]

    before = utc_now()
    jobs = {j["name"]: j for j in cluster.status()["jobs"]}
    assert set(jobs) == {"http-ok", "http-closed", "later"}
    for name in ("http-ok", "http-closed"):
        job = jobs[name]
        assert job["schedule"] == EVERY_SECOND
        next_run = slot_time(job["next_run"])
        # Every second: the next slot, give or take the one being fired right now.
        assert before - timedelta(seconds=1) < next_run <= before + timedelta(seconds=2), job
    assert jobs["http-ok"]["last_status"] == "succeeded"
    assert jobs["http-closed"]["last_status"] == "failed"
    assert jobs["later"]["last_status"] is None
    assert slot_time(jobs["later"]["next_run"]) == datetime(before.year + 1, 1, 1, tzinfo=UTC)

    output = cluster.output()
    assert f"job.succeeded: http-ok {ok['scheduled_for']}" in output
    assert f"job.failed: http-closed {bad['scheduled_for']}" in output


# ---------------------------------------------------------------- check refuses bad jobs


GOOD = job_toml("good", command=["true"])


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param(job_toml("tick", "61 * * * * *", command=["true"]), ["tick", "schedule"], id="bad-schedule"),
        pytest.param(
            job_toml("tick", command=["true"], timezone="Europe/Atlantis"),
            ["tick", "timezone", "Europe/Atlantis"],
            id="unknown-timezone",
        ),
        pytest.param(
            job_toml("tick", command=["true"], call="job_funcs:write_env"),
            ["tick", "command", "call"],
            id="command-and-call",
        ),
        pytest.param(GOOD + GOOD, ["good", "name", "duplicate"], id="duplicate-name"),
    ],
)
def test_check_refuses_bad_jobs(tmp_path, text, needles):
    path = tmp_path / "clusterctl.toml"
    path.write_text(text)
    line = one_error_line(bare_cli(tmp_path, "check"))
    assert "clusterctl.toml" in line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    path.write_text(GOOD)
    assert bare_cli(tmp_path, "check").returncode == 0
