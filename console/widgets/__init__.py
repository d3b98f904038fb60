"""The console's views, one module each."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import DataTable

Column = tuple[str, str, int]  # key, label, width


def add_columns(table: DataTable, columns: Iterable[Column]) -> None:
    """Fixed-width columns with stable keys, so cells can be updated in place."""
    for key, label, width in columns:
        table.add_column(label, key=key, width=width)
