"""`?`: every key the console answers to."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for key, description in self.keys:
            if key:
                table.add_row(Text(key, style="bold"), Text(description))
            else:
                table.add_row(Text(description, style="bold underline"), Text(""))
        with VerticalScroll(id="help"):
            yield Static(table)
            yield Static("Esc closes.", id="help-foot")
