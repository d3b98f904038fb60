"""The webhooks view: endpoints with success rate and queue depth, recent deliveries."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from runtime.snapshot import Delivery, EndpointSnapshot

from ..format import status, styled
from ..keys import command_bindings
from . import add_columns


class WebhooksView(Vertical):
    BINDINGS = command_bindings("replay")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._deliveries: list[Delivery] = []
        self._key: tuple[tuple[int, str, int], ...] = ()

    def compose(self) -> ComposeResult:
        yield DataTable(id="endpoints-table", cursor_type="none")
        yield DataTable(id="deliveries-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="delivery-detail")

    def on_mount(self) -> None:
        endpoints = self.query_one("#endpoints-table", DataTable)
        add_columns(
            endpoints,
            (
                ("name", "ENDPOINT", 12),
                ("state", "STATE", 8),
                ("ok", "OK %", 5),
                ("queue", "QUEUE", 5),
                ("flight", "SENDING", 7),
                ("dead", "DEAD", 4),
                ("url", "URL", 28),
            ),
        )
        deliveries = self.query_one("#deliveries-table", DataTable)
        add_columns(
            deliveries,
            (
                ("id", "ID", 5),
                ("endpoint", "ENDPOINT", 10),
                ("type", "EVENT", 20),
                ("status", "STATUS", 9),
                ("tries", "TRY", 3),
                ("code", "CODE", 4),
                ("error", "LAST ERROR", 18),
            ),
        )

    def apply(
        self, endpoints: tuple[EndpointSnapshot, ...], queues: dict[str, dict[str, int]], deliveries: list[Delivery]
    ) -> None:
        table = self.query_one("#endpoints-table", DataTable)
        with self.app.batch_update():
            table.clear()
            for e in endpoints:
                counts = queues.get(e.name, {})
                done = counts.get("delivered", 0)
                tried = done + counts.get("dead", 0) + counts.get("failed", 0)
                table.add_row(
                    styled(e.name, "bold"),
                    styled("on", "green") if e.enabled else styled("off", "bold red"),
                    f"{done / tried * 100:.0f}" if tried else "-",
                    str(counts.get("pending", 0) + counts.get("failed", 0)),
                    str(e.in_flight),
                    Text(str(counts.get("dead", 0)), style="bold red" if counts.get("dead") else "dim"),
                    e.url,
                    key=e.name,
                )
            key = tuple((d.id, d.status, d.attempt) for d in deliveries)
            if key != self._key:
                rows = self.query_one("#deliveries-table", DataTable)
                cursor = rows.cursor_row
                rows.clear()
                for d in deliveries:
                    rows.add_row(
                        str(d.id),
                        d.endpoint,
                        d.type,
                        status(d.status),
                        str(d.attempt),
                        str(d.response_code or "-"),
                        styled(d.last_error or "", "red"),
                        key=str(d.id),
                    )
                if 0 <= cursor < len(deliveries):
                    rows.move_cursor(row=cursor)
                self._deliveries, self._key = deliveries, key
        self.show_detail()

    def selected(self) -> Delivery | None:
        table = self.query_one("#deliveries-table", DataTable)
        if 0 <= table.cursor_row < len(self._deliveries):
            return self._deliveries[table.cursor_row]
        return None

    def show_detail(self) -> None:
        d = self.selected()
        detail = self.query_one("#delivery-detail", Static)
        if d is None:
            detail.update(Text("no deliveries yet", style="dim"))
            return
        text = Text(f"{d.event_id}  {d.type} → {d.endpoint}  ", style="bold")
        text.append(f"created {d.created_at}")
        if d.last_error:
            text.append(f"\n{d.last_error}", style="red")
        if d.status in ("dead", "failed"):
            text.append("\ny: replay (same webhook-id, new signature)", style="dim")
        detail.update(text)
