"""The console: a Textual app on a cluster's primary, in its process or attached to it.

In the process that is the primary (`clusterctl-tui`), the runtime's `Primary`
runs in this app's own event loop; attached (`clusterctl-tui attach`), a
`console.remote.RemoteBackend` stands in for it over the control socket. Either
way the console only renders immutable snapshots and runs the runtime's
commands (runtime.commands: scale, reload, kill, run job, pause, replay, stop);
it never reaches into runtime internals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, TabbedContent, TabPane

from runtime import ClusterSnapshot, Event, EventBus, StartupError
from runtime.commands import COMMANDS
from runtime.control import ControlError, NoPrimary
from runtime.demo import LoadGenerator
from runtime.logs import LogLine
from runtime.snapshot import Delivery, JobRun
from runtime.wire import decode

from .keys import command_bindings
from .remote import LOST, RESTORED
from .screens.confirm import ConfirmScreen
from .screens.help import HelpScreen
from .widgets.events import EventsView
from .widgets.jobs import JobsView
from .widgets.webhooks import WebhooksView
from .widgets.workers import WorkersView

REFRESH = 1.0  # seconds between snapshots
STORE_REFRESH = 2.0  # seconds between reads of history and deliveries (visible tab only)
EXIT_BAD_INPUT = 2
EXIT_NOT_RUNNING = 3
SELECT_ON = {"worker": "Workers", "job": "Jobs", "delivery": "Webhooks"}
TOASTS = {
    LOST: "error",
    RESTORED: "information",
    "worker.crashed": "error",
    "cluster.reloaded": "information",
    "cluster.reload_failed": "error",
    "job.failed": "warning",
    "webhook.dead": "warning",
    "webhook.endpoint_disabled": "error",
}


DETACH = "detach"  # ClusterConsole.outcome when the console left a running cluster behind


def help_keys(attached: bool, detachable: bool) -> list[tuple[str, str]]:
    palette = "command palette: every action by name"
    if attached:
        leave = [("q / d", "close this console; the cluster keeps running")]
        palette += " (Stop cluster stops it)"
    else:
        leave = [("q", "stop the cluster and quit (asks first)")]
        if detachable:
            leave.append(("d", "detach: close the console, the cluster keeps serving (`attach` returns)"))
    return [
        ("", "everywhere"),
        ("+ / -", "add a worker / remove one (it drains first)"),
        ("r", "rolling restart, one slot at a time (asks first)"),
        ("g", "demo load generator on/off"),
        ("1 2 3 4", "workers / jobs / webhooks / events"),
        *leave,
        ("ctrl+p", palette),
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
    """What the console needs of a cluster: `runtime.Primary` and `console.remote.RemoteBackend` are two."""

    events: EventBus
    running: bool

    async def start(self) -> None: ...
    async def wait(self) -> None: ...
    def snapshot(self) -> ClusterSnapshot: ...
    async def call(self, command: str, **args: Any) -> Any: ...
    def worker_tail(self, worker_id: int, limit: int = 20) -> list[LogLine]: ...
    def subscribe_logs(self, callback: Callable[[list[LogLine]], None]) -> Callable[[], None]: ...


class ClusterConsole(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "clusterctl-tui"
    BINDINGS = [
        *command_bindings("scale", "reload"),
        Binding("g", "toggle_load", "Load", id="toggle_load"),
        Binding("question_mark", "help", "Help", id="help", key_display="?"),
        Binding("q", "quit", "Quit", id="quit"),
        Binding("d", "detach", "Detach", show=False, id="detach"),
        Binding("1", "tab('workers')", "Workers", show=False, id="tab_workers"),
        Binding("2", "tab('jobs')", "Jobs", show=False, id="tab_jobs"),
        Binding("3", "tab('webhooks')", "Webhooks", show=False, id="tab_webhooks"),
        Binding("4", "tab('events')", "Events", show=False, id="tab_events"),
    ]

    def __init__(
        self,
        backend: Backend,
        start_backend: bool = True,
        clock: Callable[[], datetime] | None = None,
        attached: bool = False,
        detachable: bool = False,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.clock = clock or (lambda: datetime.now(UTC))
        self.start_backend = start_backend
        self.attached = attached  # to a primary in another process: leaving never stops it
        self.detachable = detachable  # a launcher owns the terminal: `d` leaves the cluster serving
        self.error: str | None = None
        self.outcome: str | None = None
        self.started = False
        self.snap: ClusterSnapshot | None = None
        self.load: LoadGenerator | None = None
        self.starting: asyncio.Future[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []

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

    def on_unmount(self) -> None:
        # A detached console leaves its primary running: it must stop listening to it.
        for unsubscribe in self._unsubscribe:
            unsubscribe()

    @property
    def active(self) -> str:
        """The visible tab ("" while the app is starting or shutting down)."""
        if not self.screen_stack:
            return ""
        tabs = self.screen_stack[0].query(TabbedContent)
        return tabs.first().active if tabs else ""

    # ------------------------------------------------------------------ the cluster

    async def _run_cluster(self) -> None:
        # Shielded: a console that detaches while the primary starts must not cancel the start.
        self.starting = asyncio.ensure_future(self.backend.start())
        try:
            await asyncio.shield(self.starting)
        except (StartupError, ControlError) as exc:
            self.error = str(exc)
            self.exit(EXIT_NOT_RUNNING if isinstance(exc, NoPrimary) else EXIT_BAD_INPUT)
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
        self._unsubscribe = [
            self.backend.events.subscribe(self._on_event),
            self.backend.subscribe_logs(lambda lines: events.add_batch(lines, _log_line)),
        ]
        snap = self.backend.snapshot()
        self.sub_title = f"{snap.bind} · pid {snap.pid}" + (" · attached" if self.attached else "")
        self.refresh_view()

    def _on_event(self, event: Event) -> None:
        self.query_one(EventsView).add(_event_line(event))
        if event.kind == LOST:
            self.sub_title = "primary gone: waiting for one to attach to (q closes)"
        elif event.kind == RESTORED:
            snap = self.backend.snapshot()
            self.sub_title = f"{snap.bind} · pid {snap.pid} · attached"
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
            runs = await self.backend.call("runs", job=view.selected_job(), status=view.status_filter, limit=200)
            view.apply_runs(decode(list[JobRun], runs))
        elif self.active == "webhooks":
            queues = await self.backend.call("queues")
            deliveries = await self.backend.call("deliveries", limit=200)
            self.query_one(WebhooksView).apply(
                self.backend.snapshot().endpoints, queues, decode(list[Delivery], deliveries)
            )

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

    def _selection(self) -> dict[str, Any]:
        """What the operator has selected on the visible tab, as command arguments."""
        found: dict[str, Any] = {}
        if self.active == "workers" and (worker := self.query_one(WorkersView).selected()) and worker.pid:
            found["worker"] = worker.id
        elif self.active == "jobs" and (job := self.query_one(JobsView).selected_job()):
            found["job"] = job
        elif self.active == "webhooks" and (delivery := self.query_one(WebhooksView).selected()):
            found["delivery"] = delivery.id
        return found

    @work(group="command")
    async def action_command(self, name: str, fixed: dict[str, Any] | None = None) -> None:
        """Run one of the runtime's commands: arguments from the key, then from the selection."""
        command = COMMANDS[name]
        args = {**self._selection(), **(fixed or {})}
        missing = [arg.name for arg in command.args if arg.required and arg.name not in args]
        if missing:
            self.notify(f"{name}: select a {missing[0]} first ({SELECT_ON[missing[0]]} tab)", severity="warning")
            return
        if command.confirm and not await self.push_screen_wait(
            ConfirmScreen(command.confirm.format(**args), command.title or name.capitalize())
        ):
            return
        if name == "reload":
            self.notify("rolling restart started")
        try:
            result = await self.backend.call(name, **{arg.name: args.get(arg.name) for arg in command.args})
        except ControlError as exc:
            self.notify(str(exc), title=name, severity="error", markup=False)
            return
        self.notify(command.report(result), title=name, markup=False)
        if name in ("pause-job", "resume-job"):
            self.refresh_view()
        elif name == "replay":
            await self._refresh_store()

    def action_pause_job(self) -> None:
        name = self._selection().get("job")
        paused = next((job.paused for job in self.snap.jobs if job.name == name), False) if self.snap else False
        self.action_command("resume-job" if paused else "pause-job")

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
        self.push_screen(HelpScreen(help_keys(self.attached, self.detachable)))

    @work(exclusive=True, group="quit")
    async def action_quit(self) -> None:
        if self.attached or not self.started:
            self.exit(0)
            return
        count = self.snap.desired_workers if self.snap else 0
        if not await self.push_screen_wait(
            ConfirmScreen(f"Stop the cluster? {count} workers will drain and exit.", "Stop")
        ):
            return
        self.notify("stopping: draining workers…")
        await self.backend.call("stop")

    def action_detach(self) -> None:
        """Leave the cluster serving: an attached console just closes; the primary's own needs a launcher."""
        if self.attached:
            self.exit(0)
        elif self.detachable:
            self.outcome = DETACH
            self.exit(0)
        else:
            self.notify("no launcher to detach from: run `clusterctl-tui` on a terminal, or `up --headless`")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for command in COMMANDS.values():
            if command.console and command.title:
                yield SystemCommand(command.title, command.help, partial(self.action_command, command.name))
        yield SystemCommand("Pause or resume job", "Toggle the selected job's schedule", self.action_pause_job)
        yield SystemCommand("Toggle load generator", "A light load on the demo app", self.action_toggle_load)
        if self.attached or self.detachable:
            yield SystemCommand("Detach", "Close the console; the cluster keeps running", self.action_detach)


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
    if line.worker_id == 0:  # clusterctl's own note about the output (lines dropped)
        return Text(f"clusterctl: {line.text}", style="dim italic")
    text = Text(f"w{line.worker_id}[{line.pid}] ", style="bold magenta" if line.stream == "err" else "bold blue")
    text.append(line.text)
    return text


def _tail_line(line: LogLine) -> Text:
    return Text(f"{line.stream}| {line.text}", style="red" if line.stream == "err" else "")
