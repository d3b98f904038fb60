"""The workers view: cluster totals (and the other primaries on the store), a request-rate sparkline, one row
per worker, its last output."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, ProgressBar, Sparkline, Static

from runtime import ClusterSnapshot, WorkerSnapshot

from ..format import duration, number, size, spark, state, styled
from ..keys import command_bindings
from . import add_columns

WIDE = 100  # columns at and above which the table shows p50 and the trend
WIDER = 140  # ... and a longer trend


def _trend_width(width: int) -> int:
    return 24 if width >= WIDER else 10


def _columns(wide: bool, trend: int = 10) -> list[tuple[str, str, int]]:
    columns = [
        ("id", "ID", 2),
        ("pid", "PID", 7),
        ("state", "STATE", 8),
        ("gen", "GEN", 3),
        ("cpu", "CPU%", 5),
        ("rss", "RSS", 5),
        ("rps", "REQ/S", 7),
        ("p99", "P99 ms", 6),
        ("restarts", "↺", 3),
        ("uptime", "UP", 6),
    ]
    if wide:
        columns.insert(7, ("p50", "P50 ms", 6))
        columns.append(("trend", "TREND", trend))
    return columns


def _cells(worker: WorkerSnapshot, wide: bool, trend: int = 10) -> dict[str, object]:
    cells: dict[str, object] = {
        "id": styled(str(worker.id), "bold"),
        "pid": str(worker.pid or "-"),
        "state": state(worker.state),
        "gen": str(worker.generation),
        "cpu": number(worker.cpu_percent),
        "rss": size(worker.rss_bytes),
        "rps": number(worker.requests_per_second),
        "p99": number(worker.p99_ms),
        "restarts": styled(str(worker.restarts), "bold red" if worker.restarts else "dim"),
        "uptime": duration(worker.uptime_seconds) if worker.pid else duration(worker.backoff_seconds),
    }
    if wide:
        cells["p50"] = number(worker.p50_ms)
        cells["trend"] = styled(spark(worker.rps_history, trend), "green")
    return cells


class WorkersView(Vertical):
    BINDINGS = command_bindings("kill")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._layout: tuple[bool, int] | None = None
        self._keys: list[str] = []
        self._shown: dict[tuple[str, str], object] = {}
        self._workers: dict[str, WorkerSnapshot] = {}

    def compose(self) -> ComposeResult:
        yield Static("starting…", id="totals")
        yield Sparkline([0.0], id="cluster-spark")
        yield ProgressBar(total=1, show_eta=False, id="reload-progress")
        yield DataTable(id="workers-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="worker-tail")

    @property
    def table(self) -> DataTable:
        return self.query_one("#workers-table", DataTable)

    def selected(self) -> WorkerSnapshot | None:
        table = self.table
        if not self._keys or table.cursor_row < 0 or table.cursor_row >= len(self._keys):
            return None
        return self._workers.get(self._keys[table.cursor_row])

    def apply(self, snap: ClusterSnapshot, tail_of: Callable[[int], list[Text]]) -> None:
        """Show `snap`; `tail_of(worker_id)` gives the selected worker's last output lines."""
        self._totals(snap)
        width = max(10, self.size.width - 2)
        self.query_one("#cluster-spark", Sparkline).data = list(snap.rps_history)[-width:] or [0.0]
        progress = self.query_one("#reload-progress", ProgressBar)
        running = snap.reload is not None and snap.reload.state == "running"
        progress.display = running
        if running and snap.reload is not None:
            progress.update(total=snap.reload.total, progress=snap.reload.done)
        self._table(snap)
        selected = self.selected()
        lines = max(3, self.query_one("#worker-tail", Static).size.height - 2)
        tail = tail_of(selected.id)[-lines:] if selected is not None else []
        title = Text(f"worker {selected.id} output" if selected else "", style="bold")
        if selected is not None and selected.last_exit:
            title.append(f"  last exit: {selected.last_exit}", style="bold red")
        body = Text("\n").join(tail) if tail else Text("(no output yet)", style="dim")
        self.query_one("#worker-tail", Static).update(Text("\n").join([title, body]))

    def _totals(self, snap: ClusterSnapshot) -> None:
        ready = sum(1 for w in snap.workers if w.state == "ready")
        line = Text()
        line.append(
            f"{ready}/{snap.desired_workers} ready",
            style="bold green" if ready >= snap.desired_workers else "bold yellow",
        )
        line.append(f"  {snap.requests_per_second:.1f} req/s  p99 {snap.p99_ms:.1f} ms  ")
        line.append(f"err {snap.error_rate * 100:.1f}%", style="bold red" if snap.error_rate >= 0.01 else "")
        line.append(f"  CPU {snap.cpu_percent:.0f}%  RSS {size(snap.rss_bytes)}  gen {snap.generation}")
        if len(snap.primaries) > 1:  # the fleet sharing this store: one line, every host with its workers
            line.append(f"\n{len(snap.primaries)} primaries:", style="bold")
            for index, primary in enumerate(snap.primaries):
                line.append(" · " if index else " ", style="dim")
                if primary.pid == snap.pid:
                    line.append("◆", style="bold green")  # this one
                line.append(primary.host, style="bold")
                line.append(f"/{primary.pid}", style="dim")
                line.append(f" {primary.workers_ready} ready")
        if snap.store_error:
            line.append(f"\n⚠ {snap.store_error}", style="bold red")
        self.query_one("#totals", Static).update(line)

    def _table(self, snap: ClusterSnapshot) -> None:
        table = self.table
        wide = self.size.width >= WIDE
        trend = _trend_width(self.size.width)
        columns = _columns(wide, trend)
        keys = [f"{w.id}/{w.pid}" for w in snap.workers]
        self._workers = dict(zip(keys, snap.workers, strict=True))
        with self.app.batch_update():
            if (wide, trend) != self._layout:
                table.clear(columns=True)
                add_columns(table, columns)
                self._layout, self._keys, self._shown = (wide, trend), [], {}
            if keys != self._keys:
                selected = self._keys[table.cursor_row] if 0 <= table.cursor_row < len(self._keys) else None
                table.clear()
                self._shown = {}
                for key, worker in zip(keys, snap.workers, strict=True):
                    cells = _cells(worker, wide, trend)
                    table.add_row(*[cells[c] for c, _, _ in columns], key=key)
                    self._shown.update({(key, c): v for c, v in cells.items()})
                self._keys = keys
                if selected in keys:
                    table.move_cursor(row=keys.index(selected))
                return
            for key, worker in zip(keys, snap.workers, strict=True):
                for column, value in _cells(worker, wide, trend).items():
                    if self._shown.get((key, column)) != value:
                        table.update_cell(key, column, value, update_width=False)
                        self._shown[(key, column)] = value
