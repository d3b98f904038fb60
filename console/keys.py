"""The console's keys for the runtime's commands, drawn from the one table (runtime.commands).

A command's key calls `ClusterConsole.action_command` with the command's name and
fixed arguments; the rest (which worker, which job) comes from what is selected.
"""

from __future__ import annotations

from textual.binding import Binding

from runtime.commands import COMMANDS


def command_bindings(*names: str) -> list[Binding]:
    return [
        Binding(
            key.key,
            f"app.command({name!r}, {dict(key.args)!r})",
            key.description,
            key_display=key.display,
            id=key.id or name.replace("-", "_"),
        )
        for name in names
        for key in COMMANDS[name].keys
    ]
