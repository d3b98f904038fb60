"""Worker output: every path a line takes is bounded (unit level; the flooding worker is in test_faults)."""

from __future__ import annotations

from pathlib import Path

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


def test_a_flood_keeps_a_budget_of_lines_and_counts_the_rest() -> None:
    sink = WorkerLogs(None)
    reader = OutputReader(sink, 1, 100, "out")
    kept: list[LogLine] = []
    sink.subscribers.append(kept.append)
    chunk = b"flood\n" * 10_000
    for _ in range(10):
        reader.feed(chunk)
    reader.close()
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
        assert sink._pending_bytes <= 10_000 and sink.dropped > 800
    finally:
        sink.close()
    text = (tmp_path / "logs" / "workers.log").read_text()
    assert "w1[100] out| line 0000" in text
    assert f"{sink.dropped} worker output lines dropped" in text
