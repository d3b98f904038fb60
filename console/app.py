"""The console: a Textual app that is the primary.

The runtime's `Primary` runs in this app's own event loop. The console only
renders its immutable snapshots and sends it actions (scale, reload, kill,
run job, pause, replay, stop); it never reaches into runtime internals.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, TabbedContent, TabPane

from runtime import ClusterSnapshot, Event, EventBus, ReloadFailed, Settings, StartupError
from runtime.demo import LoadGenerator
from runtime.logs import LogLine

from .screens.confirm import ConfirmScreen
from .screens.help import HelpScreen
from .widgets.events import EventsView
from .widgets.jobs import JobsView
from .widgets.webhooks import WebhooksView
from .widgets.workers import WorkersView

REFRESH = 1.0  # seconds between snapshots
STORE_REFRESH = 2.0  # seconds between reads of history and deliveries (visible tab only)
TOASTS = {
    "worker.crashed": "error",
    "cluster.reloaded": "information",
    "cluster.reload_failed": "error",
    "job.failed": "warning",
    "webhook.dead": "warning",
    "webhook.endpoint_disabled": "error",
}


HELP = [
    ("", "everywhere"),
    ("+ / -", "add a worker / remove one (it drains first)"),
    ("r", "rolling restart, one slot at a time (asks first)"),
    ("g", "demo load generator on/off"),
    ("1 2 3 4", "workers / jobs / webhooks / events"),
    ("q", "stop the cluster and quit (asks first)"),
    ("ctrl+p", "command palette: every action by name"),
    ("", "workers"),
    ("↑ ↓", "select a worker; its last output shows below"),
    ("k", "SIGKILL the selected worker (asks first)"),
    ("", "jobs"),
    ("j / p", "run the selected job now / pause or resume it"),
    ("f", "filter the history by status"),
    ("", "webhooks"),
    ("y", "replay the selected delivery (same webhook-id)"),
    ("", "events"),
    ("f", "follow on/off; type in the box to filter"),
]


class Backend(Protocol):
    """What the console needs of the runtime: `runtime.Primary` is one."""

    settings: Settings
    events: EventBus
    running: bool

    async def start(self) -> None: ...
    async def wait(self) -> None: ...
    def request_stop(self) -> None: ...
    def snapshot(self) -> ClusterSnapshot: ...
    def scale_by(self, delta: int) -> int: ...
    async def reload(self) -> int: ...
    def kill_worker(self, worker_id: int) -> int: ...
    async def run_job(self, name: str) -> int: ...
    async def set_job_paused(self, name: str, paused: bool) -> None: ...
    async def replay_delivery(self, delivery_id: int) -> list[int]: ...
    async def job_history(
        self, job: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...
    async def deliveries(self, limit: int = 100) -> list[dict[str, Any]]: ...
    async def endpoint_queues(self) -> dict[str, dict[str, int]]: ...
    def worker_tail(self, worker_id: int, limit: int = 20) -> list[LogLine]: ...
    def subscribe_logs(self, callback: Any) -> Any: ...


class ClusterConsole(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "clusterctl-tui"
    BINDINGS = [
        Binding("plus", "scale(1)", "+1", id="scale_up", key_display="+"),
        Binding("minus", "scale(-1)", "-1", id="scale_down", key_display="-"),
        Binding("r", "reload", "Restart", id="reload"),
        Binding("g", "toggle_load", "Load", id="toggle_load"),
        Binding("question_mark", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit", "Quit", id="quit"),
        Binding("1", "tab('workers')", "Workers", show=False, id="tab_workers"),
        Binding("2", "tab('jobs')", "Jobs", show=False, id="tab_jobs"),
        Binding("3", "tab('webhooks')", "Webhooks", show=False, id="tab_webhooks"),
        Binding("4", "tab('events')", "Events", show=False, id="tab_events"),
    ]

    def __init__(
        self, backend: Backend, start_backend: bool = True, clock: Callable[[], datetime] | None = None
    ) -> None:
        super().__init__()
        self.backend = backend
        self.clock = clock or (lambda: datetime.now(UTC))
        self.start_backend = start_backend
        self.error: str | None = None
        self.started = False
        self.snap: ClusterSnapshot | None = None
        self.load: LoadGenerator | None = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with TabbedContent(initial="workers"):
            with TabPane("1 Workers", id="workers"):
                yield WorkersView(id="workers-view")
            with TabPane("2 Jobs", id="jobs"):
                yield JobsView(id="jobs-view")
            with TabPane("3 Webhooks", id="webhooks"):
                yield WebhooksView(id="webhooks-view")
            with TabPane("4 Events", id="events"):
                yield EventsView(id="events-view")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "starting…"
        if self.start_backend:
            self.run_worker(self._run_cluster(), name="cluster", exit_on_error=False)
        else:
            self._attach()
        self.set_interval(REFRESH, self.refresh_view)
        self.run_worker(self._poll_store(), name="store", exit_on_error=False)

    @property
    def active(self) -> str:
        """The visible tab ("" while the app is starting or shutting down)."""
        if not self.screen_stack:
            return ""
        tabs = self.screen_stack[0].query(TabbedContent)
        return tabs.first().active if tabs else ""

    # ------------------------------------------------------------------ the cluster

    async def _run_cluster(self) -> None:
        try:
            await self.backend.start()
        except StartupError as exc:
            self.error = str(exc)
            self.exit(2)
            return
        if not self.backend.running:  # told to stop while starting: already drained
            self.exit(0)
            return
        self._attach()
        await self.backend.wait()
        self.exit(0)

    def _attach(self) -> None:
        self.started = True
        events = self.query_one(EventsView)
        for event in self.backend.events.recent:
            events.add(_event_line(event))
        self.backend.events.subscribe(self._on_event)
        self.backend.subscribe_logs(lambda line: events.add(_log_line(line)))
        snap = self.backend.snapshot()
        self.sub_title = f"{snap.bind} · pid {snap.pid}"
        self.refresh_view()

    def _on_event(self, event: Event) -> None:
        self.query_one(EventsView).add(_event_line(event))
        severity = TOASTS.get(event.kind)
        if severity:
            who = f"worker {event.worker_id}: " if event.worker_id is not None else ""
            self.notify(who + event.message, title=event.kind, severity=severity, markup=False)  # type: ignore[arg-type]

    def refresh_view(self) -> None:
        """Take a snapshot and apply it to what is on screen (nothing hidden, nothing under a modal)."""
        if not self.started or len(self.screen_stack) > 1:
            return
        try:
            self.snap = snap = self.backend.snapshot()
        except Exception as exc:  # the runtime must never take the console down
            self.sub_title = f"runtime error: {exc}"
            return
        active = self.active
        if active == "workers":
            self.query_one(WorkersView).apply(
                snap, lambda worker_id: [_tail_line(line) for line in self.backend.worker_tail(worker_id, 40)]
            )
        elif active == "jobs":
            self.query_one(JobsView).apply_jobs(snap.jobs, self.clock())

    async def _poll_store(self) -> None:
        """History and deliveries live in SQLite; read them (off the loop, in the store thread) for the visible tab."""
        while True:
            if self.started and len(self.screen_stack) == 1:
                try:
                    await self._refresh_store()
                except Exception as exc:  # a busy or broken store is reported, not fatal
                    self.sub_title = f"store: {exc}"
            await asyncio.sleep(STORE_REFRESH)

    async def _refresh_store(self) -> None:
        if self.active == "jobs":
            view = self.query_one(JobsView)
            runs = await self.backend.job_history(view.selected_job(), view.status_filter, 200)
            view.apply_runs(runs)
        elif self.active == "webhooks":
            queues = await self.backend.endpoint_queues()
            deliveries = await self.backend.deliveries(200)
            self.query_one(WebhooksView).apply(self.backend.snapshot().endpoints, queues, deliveries)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # Focus the view's main widget, so its keys show in the footer and work at once.
        focusable = event.pane.query("DataTable, RichLog")
        if focusable:
            focusable.first().focus()
        self.refresh_view()
        self.run_worker(self._refresh_store(), exit_on_error=False)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        table = event.data_table.id
        if table == "jobs-table":
            self.run_worker(self._refresh_store(), exit_on_error=False)
        elif table == "runs-table":
            self.query_one(JobsView).show_output()
        elif table == "deliveries-table":
            self.query_one(WebhooksView).show_detail()
        elif table == "workers-table":
            self.refresh_view()

    # ------------------------------------------------------------------ actions

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_scale(self, delta: int) -> None:
        try:
            count = self.backend.scale_by(delta)
        except ValueError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.notify(f"scaling to {count} workers")

    @work(exclusive=True, group="reload")
    async def action_reload(self) -> None:
        snap = self.snap
        count = snap.desired_workers if snap else 0
        if not await self.push_screen_wait(
            ConfirmScreen(f"Rolling restart of {count} workers, one at a time?", "Restart")
        ):
            return
        self.notify("rolling restart started")
        try:
            generation = await self.backend.reload()
        except ReloadFailed as exc:
            self.notify(f"rolled back: {exc}", title="reload failed", severity="error", markup=False)
            return
        self.notify(f"all workers on generation {generation}", title="reload done")

    @work(group="kill")
    async def action_kill(self) -> None:
        worker = self.query_one(WorkersView).selected() if self.active == "workers" else None
        if worker is None or worker.pid is None:
            self.notify("select a running worker on the Workers tab", severity="warning")
            return
        if not await self.push_screen_wait(ConfirmScreen(f"SIGKILL worker {worker.id} (pid {worker.pid})?", "Kill")):
            return
        try:
            self.backend.kill_worker(worker.id)
        except LookupError as exc:
            self.notify(str(exc), severity="warning")

    async def action_run_job(self) -> None:
        name = self._selected_job()
        if name is None:
            return
        try:
            run_id = await self.backend.run_job(name)
        except LookupError as exc:
            self.notify(str(exc), severity="warning")
            return
        self.notify(f"{name}: run {run_id} started")

    async def action_pause_job(self) -> None:
        name = self._selected_job()
        if name is None or self.snap is None:
            return
        paused = next((job["paused"] for job in self.snap.jobs if job["name"] == name), False)
        await self.backend.set_job_paused(name, not paused)
        self.notify(f"{name} {'resumed' if paused else 'paused'}")
        self.refresh_view()

    def _selected_job(self) -> str | None:
        name = self.query_one(JobsView).selected_job() if self.active == "jobs" else None
        if name is None:
            self.notify("select a job on the Jobs tab", severity="warning")
        return name

    async def action_replay(self) -> None:
        delivery = self.query_one(WebhooksView).selected() if self.active == "webhooks" else None
        if delivery is None:
            self.notify("select a delivery on the Webhooks tab", severity="warning")
            return
        ids = await self.backend.replay_delivery(delivery["id"])
        self.notify(f"delivery {delivery['id']} queued again as {', '.join(map(str, ids))}")
        await self._refresh_store()

    def action_filter(self) -> None:
        if self.active == "jobs":
            status = self.query_one(JobsView).cycle_filter()
            self.notify(f"history: status {status or 'any'}")
            self.run_worker(self._refresh_store(), exit_on_error=False)
        elif self.active == "events":
            follow = self.query_one(EventsView).toggle_follow()
            self.notify(f"follow {'on' if follow else 'off'}")

    def action_toggle_load(self) -> None:
        snap = self.snap
        if snap is None or snap.bind.startswith("unix:"):
            self.notify("the load generator needs a TCP bind", severity="warning")
            return
        if self.load is None:
            self.load = LoadGenerator(snap.bind)
        running = self.load.toggle()
        self.notify(f"load generator {'on (about 40 req/s)' if running else 'off'}")

    def action_help(self) -> None:
        self.push_screen(HelpScreen(HELP))

    @work(exclusive=True, group="quit")
    async def action_quit(self) -> None:
        count = self.snap.desired_workers if self.snap else 0
        if self.started and not await self.push_screen_wait(
            ConfirmScreen(f"Stop the cluster? {count} workers will drain and exit.", "Stop")
        ):
            return
        if not self.started:
            self.exit(0)
            return
        self.notify("stopping: draining workers…")
        self.backend.request_stop()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        commands = [
            ("Scale up", "Add one worker", lambda: self.action_scale(1)),
            ("Scale down", "Remove one worker (it drains first)", lambda: self.action_scale(-1)),
            ("Rolling restart", "Replace every worker, one at a time", self.action_reload),
            ("Kill worker", "SIGKILL the selected worker; it is replaced", self.action_kill),
            ("Run job now", "Run the selected job (a manual run)", self.action_run_job),
            ("Pause or resume job", "Toggle the selected job's schedule", self.action_pause_job),
            ("Replay delivery", "Deliver the selected webhook again", self.action_replay),
            ("Toggle load generator", "A light load on the demo app", self.action_toggle_load),
            ("Stop cluster", "Drain every worker and quit", self.action_quit),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)


def _event_line(event: Event) -> Text:
    line = Text(datetime.fromtimestamp(event.at).strftime("%H:%M:%S "), style="dim")
    style = (
        "bold red"
        if event.kind in ("worker.crashed", "cluster.reload_failed", "job.failed", "webhook.dead")
        else "cyan"
    )
    line.append(f"{event.kind:<23}", style=style)
    if event.worker_id is not None:
        line.append(f"w{event.worker_id} ", style="bold")
    line.append(event.message)
    return line


def _log_line(line: LogLine) -> Text:
    text = Text(f"w{line.worker_id}[{line.pid}] ", style="bold magenta" if line.stream == "err" else "bold blue")
    text.append(line.text)
    return text


def _tail_line(line: LogLine) -> Text:
    return Text(f"{line.stream}| {line.text}", style="red" if line.stream == "err" else "")


def run_console(settings: Settings) -> int:
    from runtime import Primary

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("clusterctl-tui: no terminal; running headless (use `up --headless` to say so)", file=sys.stderr)
        from runtime.headless import run_headless

        return asyncio.run(run_headless(settings))
    app = ClusterConsole(Primary(settings, console=True))
    code = app.run()
    if app.error:
        print(f"clusterctl-tui: error: {app.error}", file=sys.stderr)
    return code if isinstance(code, int) else 0
