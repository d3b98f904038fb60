"""The console's views on a fixed state (console.sample), compared with stored SVG snapshots.

Update after an intended change with `pytest tests/test_console_snapshots.py --snapshot-update`,
then look at the new SVGs (and `python screenshots/make.py` for the README's PNGs).
"""

from __future__ import annotations

import pytest

from console.app import ClusterConsole
from console.sample import NOW, SampleBackend


def sample_app(attached: bool = False) -> ClusterConsole:
    app = ClusterConsole(SampleBackend(), start_backend=False, clock=lambda: NOW, attached=attached)
    app.animation_level = "none"
    return app


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app._refresh_store()
    pilot.app.refresh_view()
    await pilot.pause()


@pytest.mark.parametrize(
    "keys, size",
    [
        (["1", "down", "down"], (100, 30)),
        (["1"], (80, 24)),
        (["2"], (100, 30)),
        (["3"], (100, 30)),
        (["4"], (100, 30)),
        (["question_mark"], (80, 24)),
    ],
    ids=["workers", "workers-80x24", "jobs", "webhooks", "events", "help-80x24"],
)
def test_view(snap_compare, keys, size, monkeypatch):
    assert snap_compare(sample_app(), terminal_size=size, run_before=pressing(keys, monkeypatch))


@pytest.mark.parametrize(
    "keys, size",
    [(["1"], (80, 24)), (["question_mark"], (80, 24))],
    ids=["workers-80x24", "help-80x24"],
)
def test_attached_view(snap_compare, keys, size, monkeypatch):
    """The console attached to a primary in another process: the same views, `attached` in the title, q leaves."""
    assert snap_compare(sample_app(attached=True), terminal_size=size, run_before=pressing(keys, monkeypatch))


def pressing(keys, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()

    async def run_before(pilot) -> None:
        await pilot.pause()
        await pilot.press(*keys)
        await settle(pilot)

    return run_before
