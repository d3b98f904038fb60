"""The jobs view: each job with its schedule and next run, its run history from the store, a run's output."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from runtime.snapshot import JobRun, JobSnapshot

from ..format import status, styled, until
from ..keys import command_bindings
from . import add_columns

STATUS_FILTERS = (None, "failed", "succeeded", "skipped", "timed_out", "running")


class JobsView(Vertical):
    BINDINGS = [
        *command_bindings("run-job"),
        Binding("p", "app.pause_job", "Pause/resume", id="pause_job"),
        Binding("f", "app.filter", "Filter", id="filter_runs"),
    ]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.status_filter: str | None = None
        self._jobs: list[str] = []
        self._runs: list[JobRun] = []
        self._runs_key: tuple[tuple[int, str], ...] = ()

    def compose(self) -> ComposeResult:
        yield DataTable(id="jobs-table", cursor_type="row")
        yield Static("", id="runs-title")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="run-output")

    def on_mount(self) -> None:
        jobs = self.query_one("#jobs-table", DataTable)
        add_columns(
            jobs,
            (
                ("name", "JOB", 16),
                ("schedule", "SCHEDULE", 15),
                ("next", "NEXT RUN", 12),
                ("last", "LAST", 10),
                ("state", "STATE", 9),
            ),
        )
        runs = self.query_one("#runs-table", DataTable)
        add_columns(
            runs,
            (
                ("id", "RUN", 5),
                ("job", "JOB", 14),
                ("slot", "SCHEDULED (UTC)", 19),
                ("trigger", "TRIGGER", 8),
                ("status", "STATUS", 10),
                ("exit", "EXIT", 4),
                ("try", "TRY", 3),
            ),
        )

    def selected_job(self) -> str | None:
        table = self.query_one("#jobs-table", DataTable)
        if 0 <= table.cursor_row < len(self._jobs):
            return self._jobs[table.cursor_row]
        return None

    def cycle_filter(self) -> str | None:
        index = STATUS_FILTERS.index(self.status_filter)
        self.status_filter = STATUS_FILTERS[(index + 1) % len(STATUS_FILTERS)]
        return self.status_filter

    def apply_jobs(self, jobs: tuple[JobSnapshot, ...], now: datetime) -> None:
        table = self.query_one("#jobs-table", DataTable)
        names = [job.name for job in jobs]
        with self.app.batch_update():
            if names != self._jobs:
                table.clear()
                for job in jobs:
                    table.add_row(*self._job_cells(job, now).values(), key=job.name)
                self._jobs = names
                return
            for job in jobs:
                for column, value in self._job_cells(job, now).items():
                    table.update_cell(job.name, column, value, update_width=False)

    @staticmethod
    def _job_cells(job: JobSnapshot, now: datetime) -> dict[str, object]:
        if job.paused:
            job_state = styled("paused", "bold yellow")
        elif job.running:
            job_state = styled(f"running×{job.running}", "yellow")
        else:
            job_state = styled("idle", "dim")
        return {
            "name": styled(job.name, "bold"),
            "schedule": job.schedule,
            "next": until(job.next_run, now) if not job.paused else "-",
            "last": status(job.last_status),
            "state": job_state,
        }

    def apply_runs(self, runs: list[JobRun]) -> None:
        job = self.selected_job()
        title = f"history: {job or 'all jobs'}, status {self.status_filter or 'any'} (f: filter)"
        self.query_one("#runs-title", Static).update(Text(title, style="bold"))
        key = tuple((r.id, r.status) for r in runs)
        if key != self._runs_key:
            table = self.query_one("#runs-table", DataTable)
            selected = self.selected_run()
            with self.app.batch_update():
                table.clear()
                for run in runs:
                    code = "-" if run.exit_code is None else str(run.exit_code)
                    table.add_row(
                        str(run.id),
                        run.job,
                        run.scheduled_for[:19].replace("T", " "),
                        run.trigger,
                        status(run.status),
                        code,
                        str(run.attempt),
                        key=str(run.id),
                    )
            self._runs, self._runs_key = runs, key
            if selected is not None:
                ids = [r.id for r in runs]
                if selected.id in ids:
                    table.move_cursor(row=ids.index(selected.id))
        self.show_output()

    def selected_run(self) -> JobRun | None:
        table = self.query_one("#runs-table", DataTable)
        if 0 <= table.cursor_row < len(self._runs):
            return self._runs[table.cursor_row]
        return None

    def show_output(self) -> None:
        run = self.selected_run()
        output = self.query_one("#run-output", Static)
        if run is None:
            output.update(Text("no runs yet", style="dim"))
            return
        lines = (run.output or "(no output)").strip().splitlines()[-6:]
        output.update(Text(f"run {run.id} output:\n", style="bold") + Text("\n".join(lines)))
