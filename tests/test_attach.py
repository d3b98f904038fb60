"""The console attached to a primary in another process: a real headless primary, consoles driven by Pilot.

The terminal side (the launcher, `d`, a terminal that dies) is in test_terminal.py, in tmux.
"""

from __future__ import annotations

import asyncio
import time

from conftest import Cluster, until

from console.app import ClusterConsole
from console.remote import LOST, RESTORED, RemoteBackend


def attached(cluster: Cluster) -> ClusterConsole:
    app = ClusterConsole(RemoteBackend(cluster.db), attached=True)
    app.animation_level = "none"
    return app


def test_an_attached_console_acts_on_the_primary_and_leaves_it_running(start_cluster):
    cluster = start_cluster(workers=2)
    app = attached(cluster)

    async def run() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.started, what="attached")
            assert "attached" in str(app.sub_title)
            assert {w.pid for w in app.backend.snapshot().workers} == {w["pid"] for w in cluster.ready_workers()}

            await pilot.press("plus")
            await until(pilot, lambda: len(cluster.ready_workers()) == 3, what="3 workers, asked from the console")

            await pilot.press("r")
            await until(pilot, lambda: len(app.screen_stack) == 2, what="the confirmation")
            await pilot.press("y")
            await until(
                pilot,
                lambda: [w.generation for w in app.backend.snapshot().workers] == [2, 2, 2],
                timeout=40,
                what="generation 2 on the console",
            )
            # The selected worker's output and the events view are fed from the primary.
            await pilot.press("4")
            await until(
                pilot,
                lambda: any("cluster.reloaded" in line.plain for line in app.query_one("EventsView").lines),
                what="the reload in the events view",
            )
            await pilot.press("q")  # no question: leaving an attached console stops nothing
            await until(pilot, lambda: not app.is_running, what="the console closed")

    asyncio.run(run())
    assert app.return_value == 0
    assert cluster.proc.poll() is None
    assert len(cluster.ready_workers()) == 3


def test_two_consoles_see_the_same_cluster(start_cluster):
    cluster = start_cluster(workers=1)
    first, second = attached(cluster), attached(cluster)

    async def run() -> None:
        async with first.run_test(size=(100, 30)) as one, second.run_test(size=(80, 24)) as two:
            await until(one, lambda: first.started and second.started, what="both attached")
            await one.press("plus")
            await until(
                two,
                lambda: (
                    second.backend.snapshot().desired_workers == 2
                    and sum(w.state == "ready" for w in second.backend.snapshot().workers) == 2
                ),
                what="the second console to see the first one's scale-up",
            )

    asyncio.run(run())


def test_the_primary_going_away_is_said_plainly_and_a_new_one_is_attached_to(start_cluster):
    cluster = start_cluster(workers=1)
    app = attached(cluster)

    async def run() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.started, what="attached")
            old_pid = app.backend.snapshot().pid
            assert cluster.cli("stop").returncode == 0
            await until(pilot, lambda: "primary gone" in str(app.sub_title), what="the console to say so")
            assert any(e.kind == LOST for e in app.backend.events.recent)
            assert app.is_running  # the last picture stays, and q still works

            replacement = start_cluster(workers=1, db=cluster.db, port=cluster.port)
            await until(
                pilot,
                lambda: app.backend.snapshot().pid == replacement.proc.pid,
                timeout=30,
                what="the console on the new primary",
            )
            assert app.backend.snapshot().pid != old_pid
            assert any(e.kind == RESTORED for e in app.backend.events.recent)

    asyncio.run(run())


def test_attach_with_no_primary_says_so_and_exits_3(tmp_path):
    app = ClusterConsole(RemoteBackend(tmp_path / "state.db"), attached=True)

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.error is not None, what="the error")

    asyncio.run(run())
    assert app.return_value == 3
    assert "no running primary" in app.error


def test_a_console_that_stops_reading_is_dropped_and_never_waited_on(start_cluster):
    """A feed nobody reads (a frozen SSH session) fills its socket; the primary goes on answering, then lets go."""
    import json
    import socket as socketlib

    from runtime.control import FEED_WRITE_TIMEOUT, socket_path

    cluster = start_cluster(app="flood_app:app", workers=2)
    stalled = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    stalled.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, 4096)
    stalled.connect(str(socket_path(cluster.db, cluster.proc.pid)))
    stalled.sendall(json.dumps({"cmd": "subscribe"}).encode() + b"\n")
    try:
        started = time.monotonic()
        while time.monotonic() - started < FEED_WRITE_TIMEOUT + 5:  # pacing: status must answer throughout
            asked = time.monotonic()
            assert cluster.status()["desired_workers"] == 2
            assert time.monotonic() - asked < 2.0
            time.sleep(0.5)
        # Then the primary has given up on the stalled reader: what is left in its buffer ends in EOF.
        stalled.settimeout(10)
        while stalled.recv(1 << 20):
            pass
    finally:
        stalled.close()
    assert cluster.proc.poll() is None
