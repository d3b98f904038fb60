"""Worker output for the operator: on the headless primary's stderr, and `clusterctl-tui logs [-n N] [-f]`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import get, wait_for

from runtime.logfiles import run_logs

STAMP = "2026-01-02 03:04:05,678"


def test_the_headless_primary_echoes_worker_lines_to_stderr_with_their_prefix(start_cluster) -> None:
    cluster = start_cluster(app="chatty_app:app", workers=2)
    pids = {w["id"]: w["pid"] for w in cluster.ready_workers()}
    assert get(cluster.port)[0] == 200
    wait_for(lambda: "served a request" in cluster.output(), 10, "the request's line on the primary's stderr")
    lines = cluster.output().splitlines()
    for slot, pid in pids.items():
        assert f"w{slot}[{pid}] hello from import" in lines
    served = [line for line in lines if line.endswith("served a request")]
    assert served and all(line in {f"w{slot}[{pid}] served a request" for slot, pid in pids.items()} for line in served)


def test_logs_prints_the_last_lines_of_a_running_cluster(start_cluster) -> None:
    cluster = start_cluster(app="chatty_app:app", workers=2)
    pids = {w["id"]: w["pid"] for w in cluster.ready_workers()}
    for _ in range(3):
        assert get(cluster.port)[0] == 200
    log = cluster.db.parent / "logs" / "workers.log"
    wait_for(lambda: log.read_text().count("served a request") == 3, 10, "three requests in workers.log")

    result = cluster.cli("logs", "-n", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"w{slot}[{pids[slot]}] served a request" for slot in served_by(log)]

    result = cluster.cli("logs", "--worker", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert f"w2[{pids[2]}] hello from import" in out and all(line.startswith(f"w2[{pids[2]}] ") for line in out)


def served_by(log: Path) -> list[int]:
    """The slots that served the requests, in the order workers.log has them."""
    return [int(line.split(" w", 1)[1].split("[")[0]) for line in log.read_text().splitlines() if "served a" in line]


def write_log(path: Path, numbers: range, slot: int = 1) -> None:
    path.write_text("".join(f"{STAMP} w{slot}[{100 + slot}] out| line {n}\n" for n in numbers))


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


def test_logs_reads_back_through_the_rotated_files(logs_dir: Path, capsys) -> None:
    write_log(logs_dir / "workers.log.3", range(0, 10))
    write_log(logs_dir / "workers.log.2", range(10, 20))
    write_log(logs_dir / "workers.log.1", range(20, 30))
    (logs_dir / "workers.log").write_text(
        f"{STAMP} w2[102] err| Traceback (most recent call last):\n"
        f"{STAMP} clusterctl: 7 worker output lines dropped (the disk fell behind)\n"
        + "".join(f"{STAMP} w1[101] out| line {n}\n" for n in range(30, 33))
        + f"{STAMP} w1[101] out| still being writ"  # no newline yet: not a line
    )
    store = logs_dir.parent / "state.db"

    assert run_logs(store, 4, False, None) == 0
    assert capsys.readouterr().out.splitlines() == [
        "clusterctl: 7 worker output lines dropped (the disk fell behind)",
        "w1[101] line 30",
        "w1[101] line 31",
        "w1[101] line 32",
    ]
    assert run_logs(store, 15, False, 1) == 0
    assert capsys.readouterr().out.splitlines() == [
        *(f"w1[101] line {n}" for n in range(19, 30)),
        "clusterctl: 7 worker output lines dropped (the disk fell behind)",  # it may concern any worker
        *(f"w1[101] line {n}" for n in range(30, 33)),
    ]
    assert run_logs(store, 1000, False, 2) == 0
    assert capsys.readouterr().out.splitlines() == [
        "w2[102] Traceback (most recent call last):",
        "clusterctl: 7 worker output lines dropped (the disk fell behind)",
    ]
    assert run_logs(store, 1000, False, None) == 0
    assert len(capsys.readouterr().out.splitlines()) == 35
    assert run_logs(store, 0, False, None) == 0
    assert capsys.readouterr().out == ""


def test_logs_reads_a_file_larger_than_one_block_backwards(logs_dir: Path, capsys) -> None:
    write_log(logs_dir / "workers.log", range(20_000))  # about 800 KB
    assert run_logs(logs_dir.parent / "state.db", 12_345, False, None) == 0
    assert capsys.readouterr().out.splitlines() == [f"w1[101] line {n}" for n in range(7655, 20_000)]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "logs", *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )


def test_logs_without_anything_to_read_says_so_in_one_line(tmp_path: Path) -> None:
    result = cli("--db", str(tmp_path / "nowhere" / "state.db"), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        result.stderr
        == f"clusterctl-tui: error: no store directory at {tmp_path / 'nowhere'} (has a primary ever run here?)\n"
    )

    result = cli("--db", str(tmp_path / "state.db"), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"clusterctl-tui: error: no worker output yet at {tmp_path / 'logs' / 'workers.log'}\n"

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "workers.log").write_text("")
    result = cli("-n", "-3", "--db", str(tmp_path / "state.db"), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1 and "-n" in result.stderr


class Follower:
    """`clusterctl-tui logs -f` in a subprocess, its stdout read without blocking so the test can poll it."""

    def __init__(self, store: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "logs", "-f", *args, "--db", str(store)],
            cwd=store.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.out = b""

    def lines(self) -> list[str]:
        assert self.proc.stdout is not None
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                self.out += chunk
        return self.out.decode().splitlines()

    def wait_lines(self, expected: list[str], what: str) -> None:
        wait_for(lambda: self.lines() == expected, 10, f"{what} (have {self.out[-300:]!r})")

    def stderr(self) -> bytes:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def end(self) -> None:
        """Kill it by PID if a failed assertion left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_logs_follow_survives_rotation_and_truncation_and_ends_quietly_on_ctrl_c(logs_dir: Path) -> None:
    log = logs_dir / "workers.log"
    write_log(log, range(5))
    follower = Follower(logs_dir.parent / "state.db", "-n", "2")
    try:
        expected = ["w1[101] line 3", "w1[101] line 4"]
        follower.wait_lines(expected, "the last two lines")

        append(log, f"{STAMP} w1[101] out| line 5\n{STAMP} w2[102] err| half a ")
        expected.append("w1[101] line 5")
        follower.wait_lines(expected, "an appended line, and not the unfinished one")
        append(log, "line\n")
        expected.append("w2[102] half a line")
        follower.wait_lines(expected, "the line once finished, whole")

        os.replace(log, logs_dir / "workers.log.1")  # rotated as the primary rotates: rename, then a new file
        write_log(log, range(6, 8))
        expected += ["w1[101] line 6", "w1[101] line 7"]
        follower.wait_lines(expected, "the lines of the new file after a rotation")

        log.write_text(f"{STAMP} w3[103] out| after truncation\n")  # shorter than what was read: truncated
        expected.append("w3[103] after truncation")
        follower.wait_lines(expected, "the line written after a truncation")

        follower.proc.send_signal(signal.SIGINT)
        assert follower.proc.wait(10) == 0
        assert follower.stderr() == b""
    finally:
        follower.end()


def test_logs_follow_filters_by_worker_and_ends_quietly_when_its_reader_goes(logs_dir: Path) -> None:
    log = logs_dir / "workers.log"
    write_log(log, range(3), slot=1)
    follower = Follower(logs_dir.parent / "state.db", "-n", "5", "--worker", "2")
    try:
        append(log, f"{STAMP} w1[101] out| not this one\n{STAMP} w2[102] out| this one\n")
        follower.wait_lines(["w2[102] this one"], "only worker 2's line")
        assert follower.proc.stdout is not None
        follower.proc.stdout.close()  # the reader goes away, as `| head -1` does
        append(log, f"{STAMP} w2[102] out| nobody reads this\n")
        assert follower.proc.wait(10) == 0
        assert follower.stderr() == b""
    finally:
        follower.end()
