"""The events view: cluster events and the workers' output, with a filter and follow mode."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, RichLog

KEEP = 2000
SHOW_PER_BATCH = 100  # a RichLog line costs about 0.2 ms to write, on the loop that also supervises the workers

T = TypeVar("T")


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
        self._write([line])

    def add_batch(self, items: Sequence[T], render: Callable[[T], Text]) -> None:
        """Many lines at once (worker output): the newest SHOW_PER_BATCH, after one line counting the rest.

        Only the lines shown are rendered: a flood costs this view the same as a busy second.
        """
        hidden = len(items) - SHOW_PER_BATCH
        lines = [render(item) for item in items[max(hidden, 0) :]]
        if hidden > 0:
            lines.insert(0, Text(f"… {hidden} lines not shown (output too fast)", style="dim italic"))
        with self.app.batch_update():
            self._write(lines)

    def _write(self, lines: list[Text]) -> None:
        self.lines.extend(lines)
        log = self.query_one(RichLog)
        for line in lines:
            if not self.filter or self.filter in line.plain.lower():
                log.write(line)

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
