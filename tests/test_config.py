"""The config loader: discovery, flag overrides, and one clear message for every bad value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.config import DEMO_TARGET, ConfigError, load_settings

# The example from DESIGN.md, verbatim apart from the comments: it is the contract.
DESIGN_EXAMPLE = """
[app]
target = "myapp.main:app"
interface = "auto"
before_start = ["python", "-m", "myapp.migrate"]

[server]
bind = "127.0.0.1:8000"
workers = "auto"
graceful_timeout = 30
timeout = 30
health_path = "/healthz"
max_requests = 0
max_memory_mb = 0

[store]
path = ".clusterctl/state.db"

[[jobs]]
name = "cleanup"
schedule = "*/5 * * * *"
timezone = "UTC"
command = ["python", "-m", "myapp.cleanup"]
timeout = 600
overlap = "skip"
catch_up = "latest"
retries = 0

[[webhooks]]
name = "ops"
url = "https://hooks.example.com/clusterctl"
events = ["worker.*", "job.failed", "app.*"]
secret = "env:OPS_WEBHOOK_SECRET"
max_attempts = 8
"""

JOB = '[[jobs]]\nname = "cleanup"\nschedule = "*/5 * * * *"\ncommand = ["true"]\n'
WEBHOOK = '[[webhooks]]\nname = "ops"\nurl = "https://hooks.example.com/x"\n'


def write(tmp_path: Path, text: str, name: str = "clusterctl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- defaults and discovery


def test_no_config_runs_the_demo(tmp_path: Path) -> None:
    settings = load_settings(None, cwd=tmp_path)
    assert settings.source is None
    assert settings.app.target == DEMO_TARGET == "runtime.demo:app"
    assert settings.is_demo
    assert settings.app.before_start == ()
    assert settings.server.bind == "127.0.0.1:8000"
    assert settings.server.workers == len(os.sched_getaffinity(0))
    assert settings.store.path == tmp_path / ".clusterctl" / "state.db"
    assert settings.jobs == ()


def test_discovers_clusterctl_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nworkers = 3\nbind = "127.0.0.1:9001"\n')
    settings = load_settings(None, cwd=tmp_path)
    assert settings.source == path
    assert settings.server.workers == 3
    assert settings.server.bind == "127.0.0.1:9001"


def test_discovers_tool_clusterctl_in_pyproject(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[project]\nname = "x"\n\n[tool.clusterctl.app]\ntarget = "myapp.main:app"\n\n'
        "[tool.clusterctl.server]\nworkers = 5\n",
        "pyproject.toml",
    )
    settings = load_settings(None, cwd=tmp_path)
    assert settings.source == path
    assert settings.app.target == "myapp.main:app"
    assert settings.server.workers == 5


def test_pyproject_without_tool_clusterctl_is_no_config(tmp_path: Path) -> None:
    write(tmp_path, '[project]\nname = "x"\n\n[tool.ruff]\nline-length = 100\n', "pyproject.toml")
    settings = load_settings(None, cwd=tmp_path)
    assert settings.source is None
    assert settings.is_demo


def test_clusterctl_toml_wins_over_pyproject(tmp_path: Path) -> None:
    own = write(tmp_path, "[server]\nworkers = 2\n")
    write(tmp_path, "[tool.clusterctl.server]\nworkers = 7\n", "pyproject.toml")
    settings = load_settings(None, cwd=tmp_path)
    assert settings.source == own
    assert settings.server.workers == 2


def test_errors_in_pyproject_name_pyproject(tmp_path: Path) -> None:
    write(tmp_path, "[tool.clusterctl.server]\nbogus = 1\n", "pyproject.toml")
    with pytest.raises(ConfigError, match=r"pyproject\.toml.*\[server\].*'bogus'"):
        load_settings(None, cwd=tmp_path)


def test_explicit_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found.*nope.toml"):
        load_settings(tmp_path / "nope.toml")


def test_design_example_is_valid(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, DESIGN_EXAMPLE), cwd=tmp_path)
    assert settings.app.before_start == ("python", "-m", "myapp.migrate")
    assert settings.server.health_path == "/healthz"
    assert [job.name for job in settings.jobs] == ["cleanup"]
    assert settings.jobs[0].command == ("python", "-m", "myapp.cleanup")
    assert [hook.name for hook in settings.webhooks] == ["ops"]
    assert settings.webhooks[0].events == ("worker.*", "job.failed", "app.*")


# ---------------------------------------------------------------- flags and "auto"


def test_flags_override_the_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        '[app]\ntarget = "fromfile:app"\n[server]\nbind = "127.0.0.1:8000"\nworkers = 4\n[store]\npath = "file.db"\n',
    )
    overrides = {"app": "fromflag:app", "bind": "127.0.0.1:9999", "workers": 2, "db": "flag.db"}
    settings = load_settings(None, overrides, cwd=tmp_path)
    assert settings.app.target == "fromflag:app"
    assert settings.server.bind == "127.0.0.1:9999"
    assert settings.server.workers == 2
    assert settings.store.path == tmp_path / "flag.db"


def test_workers_flag_as_typed_string(tmp_path: Path) -> None:
    write(tmp_path, "[server]\nworkers = 4\n")
    assert load_settings(None, {"workers": "3"}, cwd=tmp_path).server.workers == 3
    assert load_settings(None, {"workers": "auto"}, cwd=tmp_path).server.workers == len(os.sched_getaffinity(0))


def test_workers_auto(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[server]\nworkers = "auto"\n'))
    assert settings.server.workers == len(os.sched_getaffinity(0))


def test_relative_store_path_resolves_against_cwd(tmp_path: Path) -> None:
    write(tmp_path, '[store]\npath = "data/state.db"\n')
    assert load_settings(None, cwd=tmp_path).store.path == tmp_path / "data" / "state.db"


def test_absolute_store_path_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "s.db"
    write(tmp_path, f'[store]\npath = "{target}"\n')
    assert load_settings(None, cwd=tmp_path).store.path == target


@pytest.mark.parametrize("target", ["a:b", "pkg.mod:app", "my_app.main:application"])
def test_good_app_targets(tmp_path: Path, target: str) -> None:
    settings = load_settings(write(tmp_path, f'[app]\ntarget = "{target}"\n'))
    assert settings.app.target == target


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "0.0.0.0:0", "[::1]:8000", "unix:/run/app.sock"])
def test_good_binds(tmp_path: Path, bind: str) -> None:
    assert load_settings(write(tmp_path, f'[server]\nbind = "{bind}"\n')).server.bind == bind


# ---------------------------------------------------------------- refused: the message names the file and the key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("bogus = 1\n", ["'bogus'"], id="unknown-top-level"),
        pytest.param("[server]\nworkerz = 2\n", ["[server]", "'workerz'"], id="unknown-in-server"),
        pytest.param('[app]\ntraget = "a:b"\n', ["[app]", "'traget'"], id="unknown-in-app"),
        pytest.param('[store]\npth = "x.db"\n', ["[store]", "'pth'"], id="unknown-in-store"),
        pytest.param(JOB + "overlapp = true\n", ["[[jobs]]", "cleanup", "'overlapp'"], id="unknown-in-job"),
        pytest.param(WEBHOOK + "secrett = 'x'\n", ["[[webhooks]]", "ops", "'secrett'"], id="unknown-in-webhook"),
        pytest.param("[server]\nworkers = -1\n", ["workers", "-1"], id="workers-negative"),
        pytest.param("[server]\nworkers = 0\n", ["workers", "0"], id="workers-zero"),
        pytest.param('[server]\nworkers = "lots"\n', ["workers", "'lots'"], id="workers-word"),
        pytest.param("[server]\nworkers = 1.5\n", ["workers", "1.5"], id="workers-float"),
        pytest.param('[server]\ntimeout = "x"\n', ["timeout", "'x'"], id="timeout-string"),
        pytest.param("[server]\ntimeout = 0\n", ["timeout", "at least"], id="timeout-zero"),
        pytest.param("[server]\ngraceful_timeout = true\n", ["graceful_timeout", "True"], id="graceful-bool"),
        pytest.param("[server]\nmax_requests = -5\n", ["max_requests", "-5"], id="max-requests-negative"),
        pytest.param('[server]\nhealth_path = "healthz"\n', ["health_path", "'/'"], id="health-path-no-slash"),
        pytest.param('[app]\ninterface = "cgi"\n', ["interface", "'cgi'"], id="interface-unknown"),
        pytest.param("[app]\nbefore_start = [1, 2]\n", ["before_start", "argv"], id="before-start-not-strings"),
        pytest.param('app = "a:b"\n', ["[app]", "table"], id="app-not-a-table"),
        pytest.param("[jobs]\nname = 'x'\n", ["jobs", "[[jobs]]"], id="jobs-not-array"),
        pytest.param(
            '[[jobs]]\nname = "tick"\nschedule = "61 * * * *"\ncommand = ["true"]\n',
            ["[[jobs]] 'tick'", "schedule", "'61 * * * *'"],
            id="cron-bad-minute",
        ),
        pytest.param(
            '[[jobs]]\nname = "tick"\nschedule = "every five minutes"\ncommand = ["true"]\n',
            ["tick", "schedule", "cron"],
            id="cron-words",
        ),
        pytest.param(
            '[[jobs]]\nname = "tick"\nschedule = "* * * *"\ncommand = ["true"]\n',
            ["tick", "schedule", "5 fields"],
            id="cron-four-fields",
        ),
        pytest.param(
            '[[jobs]]\nname = "tick"\ncommand = ["true"]\n',
            ["tick", "schedule", "missing"],
            id="job-without-schedule",
        ),
        pytest.param(
            JOB + 'timezone = "Mars/Olympus_Mons"\n',
            ["cleanup", "timezone", "'Mars/Olympus_Mons'"],
            id="unknown-timezone",
        ),
        pytest.param(
            JOB + 'call = "myapp.tasks:cleanup"\n',
            ["cleanup", "command", "call", "exactly one"],
            id="command-and-call",
        ),
        pytest.param(
            '[[jobs]]\nname = "x"\nschedule = "* * * * *"\ncall = "m:f"\nhttp = { url = "http://127.0.0.1/" }\n',
            ["call", "http", "exactly one"],
            id="call-and-http",
        ),
        pytest.param(
            '[[jobs]]\nname = "x"\nschedule = "* * * * *"\n',
            ["[[jobs]] 'x'", "exactly one of command / call / http"],
            id="no-command",
        ),
        pytest.param(
            '[[jobs]]\nname = "x"\nschedule = "* * * * *"\nhttp = { method = "POST" }\n',
            ["[[jobs]] 'x'", "http", "url"],
            id="http-without-url",
        ),
        pytest.param(JOB + 'overlap = "queue"\n', ["overlap", "'queue'"], id="overlap-unknown"),
        pytest.param(JOB + 'catch_up = "some"\n', ["catch_up", "'some'"], id="catch-up-unknown"),
        pytest.param(JOB + JOB, ["name", "duplicate", "'cleanup'"], id="duplicate-job"),
        pytest.param(WEBHOOK + WEBHOOK, ["name", "duplicate", "'ops'"], id="duplicate-webhook"),
        pytest.param(
            '[[webhooks]]\nname = "ops"\nurl = "ftp://example.com/"\n', ["[[webhooks]] 'ops'", "url"], id="webhook-url"
        ),
        pytest.param(WEBHOOK + "events = []\n", ["ops", "events"], id="webhook-no-events"),
    ],
)
def test_refused_with_file_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("secret", ["123456789", "true", '["whsec_c2VjcmV0LXZhbHVl"]', '{ v = "whsec_c2VjcmV0" }'])
def test_webhook_secret_of_wrong_type_is_never_echoed(tmp_path: Path, secret: str) -> None:
    path = write(tmp_path, WEBHOOK + f"secret = {secret}\n")
    message = config_error(path)
    assert str(path) in message
    assert "secret" in message
    for leak in ("123456789", "True", "true", "whsec_c2VjcmV0", "c2VjcmV0"):
        assert leak not in message, message


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nworkers = 2\n")
    message = config_error(path)
    assert str(path) in message
    assert "TOML" in message


def test_invalid_toml_in_discovered_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = "unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(None, cwd=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "bind", ["nonsense", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":8000", "127.0.0.1:-1", "unix:"]
)
def test_bad_bind_flag(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"bind": bind}, cwd=tmp_path)
    message = str(info.value)
    assert "bind" in message
    assert repr(bind) in message


@pytest.mark.parametrize("target", ["nocolon", ":app", "mod:", "my-app:app", "1mod:app", "a..b:app"])
def test_bad_app_flag(tmp_path: Path, target: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"app": target}, cwd=tmp_path)
    message = str(info.value)
    assert repr(target) in message
    assert "MODULE:ATTR" in message


@pytest.mark.parametrize("workers", [0, -3, "0", "abc", "", True])
def test_bad_workers_flag(tmp_path: Path, workers: object) -> None:
    with pytest.raises(ConfigError, match="workers"):
        load_settings(None, {"workers": workers}, cwd=tmp_path)


def test_bad_bind_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nbind = "nonsense"\n')
    message = config_error(path)
    assert "bind" in message
    assert str(path) in message


def test_bad_app_target_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[app]\ntarget = "nocolon"\n')
    message = config_error(path)
    assert "target" in message
    assert str(path) in message


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "clusterctl.toml"
    path.write_bytes(b"# caf\xe9\n[server]\nworkers = 1\n")
    message = config_error(path)
    assert str(path) in message


def test_pyproject_with_non_table_tool(tmp_path: Path) -> None:
    write(tmp_path, "tool = 1\n", "pyproject.toml")
    try:
        settings = load_settings(None, cwd=tmp_path)
    except ConfigError as exc:  # refusing it is as good as ignoring it; a crash is not
        assert "pyproject.toml" in str(exc)
    else:
        assert settings.source is None


@pytest.mark.parametrize(
    "toml, key",
    [
        ('[server]\nbind = "http://127.0.0.1:8000"\n', "bind"),
        ('[[jobs]]\nname = "a"\nschedule = "* * * * *"\ncall = "nocolon"\n', "call"),
    ],
)
def test_values_that_look_right_but_are_not(tmp_path, toml, key):
    path = tmp_path / "clusterctl.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert key in str(info.value) and str(path) in str(info.value)
