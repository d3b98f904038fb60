"""The events view: cluster events and the workers' output, with a filter and follow mode."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, RichLog

KEEP = 2000


class EventsView(Vertical):
    BINDINGS = [Binding("f", "app.filter", "Follow", id="follow")]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lines: deque[Text] = deque(maxlen=KEEP)
        self.filter = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter (worker id, event, text)…", id="events-filter")
        yield RichLog(id="events-log", max_lines=KEEP, wrap=True, auto_scroll=True)

    def add(self, line: Text) -> None:
        self.lines.append(line)
        if not self.filter or self.filter in line.plain.lower():
            self.query_one(RichLog).write(line)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter = event.value.strip().lower()
        log = self.query_one(RichLog)
        log.clear()
        for line in self.lines:
            if not self.filter or self.filter in line.plain.lower():
                log.write(line)

    def toggle_follow(self) -> bool:
        log = self.query_one(RichLog)
        log.auto_scroll = not log.auto_scroll
        if log.auto_scroll:
            log.scroll_end(animate=False)
        return log.auto_scroll
