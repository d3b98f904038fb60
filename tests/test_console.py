"""The console driving a real runtime: real worker processes, keys that act, a graceful quit."""

from __future__ import annotations

import asyncio
import sqlite3
import sys

import pytest
from conftest import APPS, free_port, pid_alive, until

from console.app import ClusterConsole
from runtime import Primary, load_settings

JOBS = """
[[jobs]]
name = "hello"
schedule = "0 0 1 1 *"
command = ["sh", "-c", "echo hello from $CLUSTERCTL_JOB"]
"""


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APPS))
    monkeypatch.setenv("PYTHONPATH", str(APPS))
    config = tmp_path / "clusterctl.toml"
    config.write_text(JOBS)
    return load_settings(
        config,
        {"app": "asgi_app:app", "bind": f"127.0.0.1:{free_port()}", "workers": "2", "db": str(tmp_path / "s.db")},
        cwd=tmp_path,
    )


def ready(primary: Primary) -> list:
    return [w for w in primary.snapshot().workers if w.state == "ready"]


def test_keys_drive_a_real_cluster(settings):
    asyncio.run(_keys_drive_a_real_cluster(settings))


async def _keys_drive_a_real_cluster(settings):
    primary = Primary(settings)
    app = ClusterConsole(primary)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.started and len(ready(primary)) == 2, what="2 workers")
        pids = {w.pid for w in ready(primary)}

        await pilot.press("plus")
        await until(pilot, lambda: len(ready(primary)) == 3, what="scale up to 3")
        assert primary.snapshot().desired_workers == 3

        await pilot.press("minus")
        await until(pilot, lambda: len(primary.snapshot().workers) == 2, what="scale down to 2")

        # Kill the selected worker (row 1): asks first, then the slot gets a new process.
        await pilot.press("1", "k")
        await until(pilot, lambda: len(app.screen_stack) == 2, what="the confirmation")
        victim = next(w for w in primary.snapshot().workers if w.id == 1).pid
        await pilot.press("y")
        await until(
            pilot,
            lambda: any(w.id == 1 and w.pid != victim and w.state == "ready" for w in primary.snapshot().workers),
            what="slot 1 replaced",
        )

        # Rolling restart: confirm, then every worker is of generation 2.
        await pilot.press("r")
        await until(pilot, lambda: len(app.screen_stack) == 2, what="the confirmation")
        await pilot.press("y")
        await until(
            pilot,
            lambda: [w.generation for w in primary.snapshot().workers] == [2, 2],
            timeout=30,
            what="generation 2",
        )
        assert not pids & {w.pid for w in primary.snapshot().workers}

        # Jobs: run the selected job now.
        await pilot.press("2")
        await pilot.pause()
        await pilot.press("j")
        conn = sqlite3.connect(settings.store.path)
        row = await until(
            pilot,
            lambda: conn.execute(
                "SELECT status, output, \"trigger\" FROM job_runs WHERE status != 'running'"
            ).fetchone(),
            what="the manual run",
        )
        assert row == ("succeeded", "hello from hello\n", "manual")

        # Quit asks, then drains the cluster and exits 0.
        workers = [w.pid for w in primary.snapshot().workers]
        await pilot.press("q")
        await until(pilot, lambda: len(app.screen_stack) == 2, what="the quit confirmation")
        await pilot.press("y")
        await until(pilot, lambda: not app.is_running or app.return_value is not None, timeout=30, what="exit")
    assert app.return_value == 0
    assert not any(pid_alive(pid) for pid in workers)
    conn.close()


def test_a_startup_error_ends_the_console_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(APPS))
    settings = load_settings(
        None,
        {"app": "no_such_module:app", "bind": f"127.0.0.1:{free_port()}", "workers": "1", "db": str(tmp_path / "s.db")},
        cwd=tmp_path,
    )
    app = ClusterConsole(Primary(settings))

    async def run() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.error is not None, what="the startup error")

    asyncio.run(run())
    assert app.return_value == 2
    assert "no_such_module" in app.error


def test_runtime_does_not_import_textual():
    import subprocess

    code = "import runtime, runtime.primary, runtime.cli, runtime.worker, sys; print('textual' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_a_failing_store_is_reported_and_the_console_keeps_working():
    from console.sample import NOW, SampleBackend

    class BrokenStore(SampleBackend):
        async def call(self, command, **args):
            if command == "runs":
                raise OSError("database or disk is full")
            return await super().call(command, **args)

    backend = BrokenStore()
    app = ClusterConsole(backend, start_backend=False, clock=lambda: NOW)

    async def run() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("2")
            await until(pilot, lambda: "disk is full" in str(app.sub_title), what="the store error in the title")
            await pilot.press("1", "plus")
            await until(pilot, lambda: ("scale", 1) in backend.actions, what="a key still acting")
            assert app.is_running

    asyncio.run(run())
