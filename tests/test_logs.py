"""Worker output: every path a line takes is bounded (unit level; the flooding worker is in test_faults)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from conftest import wait_for

from runtime import logs
from runtime.logs import LINES_PER_SECOND, MAX_LINE, LogLine, OutputReader, WorkerLogs


def test_lines_are_split_across_chunks_and_the_last_one_kept_at_close() -> None:
    sink = WorkerLogs(None)
    reader = OutputReader(sink, 1, 100, "out")
    for chunk in (b"hel", b"lo\nwor", b"ld\r\n", b"no newline"):
        reader.feed(chunk)
    reader.close()
    assert [line.text for line in sink.tail(1)] == ["hello", "world", "no newline"]


def test_a_line_without_end_is_cut_into_bounded_pieces() -> None:
    sink = WorkerLogs(None)
    reader = OutputReader(sink, 1, 100, "err")
    for _ in range(64):  # 4 MiB with no newline
        reader.feed(b"x" * 65536)
    assert all(len(line.text) == MAX_LINE for line in sink.tail(1, 500))
    assert len(reader._partial) <= MAX_LINE


def test_a_flood_keeps_a_budget_of_lines_and_counts_the_rest(monkeypatch) -> None:
    monkeypatch.setattr(logs, "MAX_SUBSCRIBER_LINES", 100_000)  # this test is about the reader's budget
    kept: list[LogLine] = []

    async def flood() -> OutputReader:
        sink = WorkerLogs(None)
        sink.subscribe(kept.extend)
        reader = OutputReader(sink, 1, 100, "out")
        chunk = b"flood\n" * 10_000
        for _ in range(10):
            reader.feed(chunk)
        reader.close()
        sink.close()  # hands the subscriber what is left
        return reader

    reader = asyncio.run(flood())
    assert len(kept) <= LINES_PER_SECOND * 2 + 1  # at most two one-second windows in this loop, plus the note
    assert reader.dropped + len(kept) - 1 == 100_000
    assert "lines dropped" in kept[-1].text


def test_the_file_writer_drops_and_counts_rather_than_grow(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(logs, "MAX_PENDING", 10_000)
    monkeypatch.setattr(logs, "FLUSH_INTERVAL", 3600)  # the writer sleeps: only close() flushes
    sink = WorkerLogs(tmp_path / "logs")
    try:
        for n in range(1000):
            sink.add(LogLine(1, 100, "out", f"line {n:04d} " + "y" * 40))
        assert sink._file is not None and sink._file._pending_bytes <= 10_000 and sink.dropped > 800
    finally:
        sink.close()
    text = (tmp_path / "logs" / "workers.log").read_text()
    assert "w1[100] out| line 0000" in text
    assert f"{sink.dropped} worker output lines dropped" in text


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


def line(n: int, worker_id: int = 1) -> LogLine:
    return LogLine(worker_id, 100 + worker_id, "out", f"line {n}")


def test_subscribers_get_batches_from_one_timer_never_from_add() -> None:
    async def scenario() -> None:
        sink = WorkerLogs(None)
        first: list[list[LogLine]] = []
        second: list[list[LogLine]] = []
        sink.subscribe(first.append)
        sink.subscribe(second.append)
        for n in range(10):
            sink.add(line(n))
        assert first == [] and second == []  # add() only queues
        await until(lambda: first and second, what="the first batch")
        assert first == second == [[line(n) for n in range(10)]]
        sink.add(line(10))
        await until(lambda: len(first) == 2, what="the second batch")
        assert first[1] == [line(10)]

    asyncio.run(scenario())


def test_a_subscriber_that_falls_behind_gets_a_bounded_batch_ending_with_the_count(monkeypatch) -> None:
    monkeypatch.setattr(logs, "MAX_SUBSCRIBER_LINES", 100)

    async def scenario() -> None:
        sink = WorkerLogs(None)
        batches: list[list[LogLine]] = []
        sink.subscribe(batches.append)
        for n in range(250):
            sink.add(line(n))
        await until(lambda: batches, what="a batch")
        batch = batches[0]
        assert batch[:100] == [line(n) for n in range(100)]
        note = batch[100]
        assert len(batch) == 101 and (note.worker_id, note.pid, note.stream) == (0, 0, "err")
        assert "150 worker output lines skipped" in note.text
        sink.add(line(250))  # the count starts again
        await until(lambda: len(batches) == 2, what="the next batch")
        assert batches[1] == [line(250)]

    asyncio.run(scenario())


def test_a_subscriber_that_raises_is_unsubscribed_and_the_loop_never_sees_it() -> None:
    async def scenario() -> None:
        loop_errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
        sink = WorkerLogs(None)
        calls = 0

        def broken(batch: list[LogLine]) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("the widget is gone")

        good: list[LogLine] = []
        sink.subscribe(broken)
        sink.subscribe(good.extend)
        sink.add(line(1))
        await until(lambda: good, what="the good subscriber's first batch")
        sink.add(line(2))
        await until(lambda: len(good) == 2, what="the good subscriber's second batch")
        assert calls == 1 and loop_errors == []

    asyncio.run(scenario())


def test_unsubscribe_stops_the_batches() -> None:
    async def scenario() -> None:
        sink = WorkerLogs(None)
        gone: list[list[LogLine]] = []
        stays: list[list[LogLine]] = []
        unsubscribe = sink.subscribe(gone.append)
        sink.subscribe(stays.append)
        unsubscribe()
        unsubscribe()  # twice is harmless
        sink.add(line(1))
        await until(lambda: stays, what="the remaining subscriber's batch")  # the same timer serves both
        assert gone == []

    asyncio.run(scenario())


def read_until(fd: int, wanted: bytes | Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    """Read a pipe until `wanted` has come (or the predicate holds for what came), with a deadline."""
    done = wanted if callable(wanted) else lambda data: wanted in data
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        assert time.monotonic() < deadline, f"timed out waiting for {wanted!r}; got {data[-300:]!r}"
        try:
            data += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
    return data


def test_the_echo_writes_each_line_with_its_worker_prefix() -> None:
    read_end, write_end = os.pipe()
    sink = WorkerLogs(None, echo=write_end)
    try:
        sink.add(LogLine(2, 4321, "err", "Traceback (most recent call last):"))
        sink.add(LogLine(1, 1234, "out", "served a request"))
        data = read_until(read_end, b"served a request\n")
        assert data == b"w2[4321] Traceback (most recent call last):\nw1[1234] served a request\n"
    finally:
        sink.close()
        os.close(read_end)
        os.close(write_end)


def test_a_stderr_nobody_reads_stops_neither_add_nor_workers_log(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(logs, "MAX_ECHO_PENDING", 20_000)
    monkeypatch.setattr(logs, "FLUSH_INTERVAL", 0.02)
    read_end, write_end = os.pipe()
    sink = WorkerLogs(tmp_path / "logs", echo=write_end)
    try:
        started = time.monotonic()
        for n in range(3000):  # about 600 KB: ten times what the pipe holds
            sink.add(LogLine(1, 100, "out", f"line {n:04d} " + "z" * 190))
        assert time.monotonic() - started < 2
        log = tmp_path / "logs" / "workers.log"
        wait_for(lambda: "line 2999" in log.read_text(), 10, "every line in workers.log while the echo is stuck")
        assert sink.dropped == 0 and sink.echo_dropped > 2000

        # The drops are reported as they happen, in one note or several: together they count every one.
        def noted(data: bytes) -> int:
            return sum(int(n) for n in re.findall(rb"clusterctl: (\d+) worker output lines not echoed", data))

        data = read_until(read_end, lambda data: noted(data) >= sink.echo_dropped)
        assert data.startswith(b"w1[100] line 0000 ")
        assert noted(data) == sink.echo_dropped
    finally:
        sink.close()
        os.close(read_end)
        os.close(write_end)


def test_the_events_view_writes_a_capped_batch_and_counts_the_rest() -> None:
    from rich.text import Text
    from textual.app import App, ComposeResult
    from textual.widgets import RichLog

    from console.widgets.events import SHOW_PER_BATCH, EventsView

    rendered: list[int] = []

    def render(n: int) -> Text:
        rendered.append(n)
        return Text(f"line {n}")

    class ViewApp(App[None]):
        def compose(self) -> ComposeResult:
            yield EventsView()

    async def scenario() -> None:
        app = ViewApp()
        async with app.run_test(size=(100, 30)) as pilot:
            view = app.query_one(EventsView)
            view.add_batch(range(SHOW_PER_BATCH + 150), render)
            await pilot.pause()
            shown = [line.plain for line in view.lines]
            assert shown[0] == "… 150 lines not shown (output too fast)"
            assert shown[1:] == [f"line {n}" for n in range(150, SHOW_PER_BATCH + 150)]
            assert rendered == list(range(150, SHOW_PER_BATCH + 150))  # the hidden ones cost nothing
            assert len(view.query_one(RichLog).lines) == SHOW_PER_BATCH + 1
            view.add_batch([7], render)
            await pilot.pause()
            assert [line.plain for line in view.lines][-1] == "line 7"

    asyncio.run(scenario())
