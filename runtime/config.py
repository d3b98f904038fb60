"""The config loader: `clusterctl.toml`, `[tool.clusterctl]` in pyproject.toml, flags on top.

Everything is validated before anything starts. A problem raises `ConfigError`
with one line that names the file and the key, so the CLI can print it and
exit 2.
"""

from __future__ import annotations

import difflib
import importlib.util
import io
import ipaddress
import math
import os
import re
import tomllib
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import is_url, store_label

DEMO_TARGET = "runtime.demo:app"
MAX_WORKERS = 256


class ConfigError(Exception):
    """A config problem, worded for the operator in one line."""


@dataclass(frozen=True)
class AppConfig:
    target: str = DEMO_TARGET
    interface: str = "auto"
    before_start: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "127.0.0.1:8000"
    workers: int = 1
    graceful_timeout: float = 30.0
    timeout: float = 30.0
    health_path: str | None = None
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory_mb: int = 0
    reload_batch: int = 1
    ready_timeout: float = 60.0
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    # None leaves uvicorn's own default: FORWARDED_ALLOW_IPS, else 127.0.0.1 and ::1.
    forwarded_allow_ips: tuple[str, ...] | None = None
    socket_mode: int = 0o660
    access_log: bool = False
    preload_app: bool = False  # import the app once per generation, in the fork server (runtime.forkserver)
    env_file: Path | None = None
    # What env_file held when the config was read: what workers get if it cannot be read at a spawn.
    env_file_values: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path(".clusterctl/state.db")  # the SQLite store; with a url, where the socket and logs live
    keep_runs: int = 1000
    keep_days: float = 30.0
    # A PostgreSQL URL: the shared tables live there. It may hold a password: never in a repr or a message.
    url: str | None = field(default=None, repr=False)

    @property
    def db(self) -> str:
        """Where the tables are, as CLUSTERCTL_DB gives it to workers and jobs (for `emit`)."""
        return self.url or str(self.path)

    @property
    def label(self) -> str:
        """The store as messages name it: the path, or the URL without its password."""
        return store_label(self.db)


@dataclass(frozen=True)
class MetricsConfig:
    bind: str | None = None  # HOST:PORT where the primary serves /metrics; None: no metrics server


@dataclass(frozen=True)
class JobConfig:
    name: str
    schedule: str
    timezone: str = "UTC"
    command: tuple[str, ...] | None = None
    call: str | None = None
    http: dict[str, Any] | None = None
    timeout: float = 600.0
    overlap: str = "skip"
    catch_up: str = "latest"
    retries: int = 0
    jitter: float = 0.0


@dataclass(frozen=True)
class WebhookConfig:
    name: str
    url: str
    events: tuple[str, ...] = ("*",)
    # The reference (`env:NAME`, `file:PATH` or the literal); resolved only where it is used.
    secret: str = field(default="", repr=False)
    max_attempts: int = 8
    timeout: float = 10.0
    concurrency: int = 4
    retry_base: float = 2.0


@dataclass(frozen=True)
class Settings:
    app: AppConfig = AppConfig()
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    jobs: tuple[JobConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()
    source: Path | None = None
    # How these settings were made (the `up` flags and the directory), so a reload reads them the same way.
    overrides: tuple[tuple[str, Any], ...] = field(default=(), repr=False, compare=False)
    cwd: Path | None = field(default=None, repr=False, compare=False)

    @property
    def is_demo(self) -> bool:
        return self.app.target == DEMO_TARGET

    def reread(self) -> Settings:
        """The settings as the config file says now, with the same flags; ConfigError if it no longer validates."""
        return load_settings(self.source, dict(self.overrides), self.cwd)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def find_config(cwd: Path) -> tuple[Path, dict[str, Any]] | None:
    """The config that applies in `cwd`: clusterctl.toml, else [tool.clusterctl] in pyproject.toml."""
    own = cwd / "clusterctl.toml"
    if own.is_file():
        return own, _read_toml(own)
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        tool = _read_toml(pyproject).get("tool", {})
        section = tool.get("clusterctl") if isinstance(tool, dict) else None
        if section is not None:
            if not isinstance(section, dict):
                raise ConfigError(f"{pyproject}: [tool.clusterctl] must be a table")
            return pyproject, section
    return None


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read the config (explicit path, or discovered in `cwd`), apply flag overrides, validate.

    `overrides` keys are `app`, `bind`, `workers`, `db` (the `up` flags).
    """
    cwd = cwd or Path.cwd()
    source: Path | None
    if config_path is not None:
        source = Path(config_path)
        if not source.is_file():
            raise ConfigError(f"config file not found: {source}")
        raw = _read_toml(source)
        if source.name == "pyproject.toml":
            tool = raw.get("tool", {})
            raw = tool.get("clusterctl", {}) if isinstance(tool, dict) else {}
    else:
        found = find_config(cwd)
        source, raw = found if found else (None, {})
    return _build(raw, overrides or {}, source, cwd)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


class _Section:
    """Typed reads from one table, each error naming `where` and the key."""

    def __init__(self, where: str, table: Any, known: set[str]) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} ({_known_keys_hint(unknown[0], known)})")
        self.where = where
        self.table = table

    def has(self, key: str) -> bool:
        return key in self.table

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where} {key}: {message}")

    def string(self, key: str, default: str | None, choices: tuple[str, ...] = ()) -> str | None:
        value = self.table.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or (not value and not choices):
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def number(self, key: str, default: float, minimum: float = 0, integer: bool = False) -> Any:
        value = self.table.get(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if integer else "a number"
            raise self.fail(key, f"expected {kind}, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value!r}")
        return value

    def argv(self, key: str) -> tuple[str, ...] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = value.split()
        if not value or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a list of strings (argv), got {value!r}")
        return tuple(value)


def _known_keys_hint(key: str, known: set[str]) -> str:
    """The likely intended key when one is close (a typo), else the whole list to choose from."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


_TOP = {"app", "server", "store", "metrics", "jobs", "webhooks"}
_APP = {"target", "interface", "before_start"}
_SERVER = {
    "bind",
    "workers",
    "graceful_timeout",
    "timeout",
    "health_path",
    "max_requests",
    "max_requests_jitter",
    "max_memory_mb",
    "reload_batch",
    "ready_timeout",
    "keepalive_timeout",
    "header_timeout",
    "forwarded_allow_ips",
    "socket_mode",
    "access_log",
    "preload_app",
    "env_file",
}
_STORE = {"path", "url", "keep_runs", "keep_days"}
_METRICS = {"bind"}
_JOB = {
    "name",
    "schedule",
    "timezone",
    "command",
    "call",
    "http",
    "timeout",
    "overlap",
    "catch_up",
    "retries",
    "jitter",
}
_WEBHOOK = {"name", "url", "events", "secret", "max_attempts", "timeout", "concurrency", "retry_base"}
# Every key each section accepts (for tools and tests; the loader refuses anything else).
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "app": frozenset(_APP),
    "server": frozenset(_SERVER),
    "store": frozenset(_STORE),
    "metrics": frozenset(_METRICS),
    "jobs": frozenset(_JOB),
    "webhooks": frozenset(_WEBHOOK),
}


def _build(raw: dict[str, Any], overrides: dict[str, Any], source: Path | None, cwd: Path) -> Settings:
    label = str(source) if source else "config"
    top = _Section(label, raw, _TOP)
    app = _app(_Section(f"{label}: [app]", raw.get("app", {}), _APP), overrides)
    # env_file is relative to the config file, which need not be in the working directory.
    here = source.parent if source else cwd
    server = _server(_Section(f"{label}: [server]", raw.get("server", {}), _SERVER), overrides, here)
    store = _store(_Section(f"{label}: [store]", raw.get("store", {}), _STORE), overrides, cwd)
    metrics = _metrics(_Section(f"{label}: [metrics]", raw.get("metrics", {}), _METRICS), server)
    jobs = _jobs(label, top.table.get("jobs", []))
    webhooks = _webhooks(label, top.table.get("webhooks", []))
    return Settings(
        app=app,
        server=server,
        store=store,
        metrics=metrics,
        jobs=jobs,
        webhooks=webhooks,
        source=source,
        overrides=tuple(sorted(overrides.items())),
        cwd=cwd,
    )


def _app(s: _Section, overrides: dict[str, Any]) -> AppConfig:
    target = overrides.get("app") or s.string("target", DEMO_TARGET)
    assert target is not None
    if not is_import_target(target):
        where = "--app" if overrides.get("app") else f"{s.where} target"
        raise ConfigError(f"{where}: expected MODULE:ATTR, like myapp.main:app, got {target!r}")
    interface = s.string("interface", "auto", ("auto", "asgi", "wsgi"))
    before_start = s.argv("before_start") or ()
    return AppConfig(target=target, interface=interface or "auto", before_start=before_start)


def _server(s: _Section, overrides: dict[str, Any], here: Path) -> ServerConfig:
    bind = overrides.get("bind") or s.string("bind", ServerConfig.bind)
    assert bind is not None
    try:
        parse_bind(bind)
    except ConfigError as exc:
        where = "--bind" if overrides.get("bind") else f"{s.where} bind"
        raise ConfigError(f"{where}: {exc}") from None
    workers_raw = overrides.get("workers", s.table.get("workers", "auto"))
    workers = parse_workers(workers_raw, f"{s.where} workers")
    health = s.string("health_path", None)
    if health is not None and not health.startswith("/"):
        raise s.fail("health_path", f"must start with '/', got {health!r}")
    max_requests = s.number("max_requests", 0, integer=True)
    access_log = s.table.get("access_log", False)
    if not isinstance(access_log, bool):
        raise s.fail("access_log", f"expected true or false, got {access_log!r}")
    preload_app = s.table.get("preload_app", False)
    if not isinstance(preload_app, bool):
        raise s.fail("preload_app", f"expected true or false, got {preload_app!r}")
    env_file, env_file_values = _env_file(s, here)
    return ServerConfig(
        bind=bind,
        workers=workers,
        graceful_timeout=s.number("graceful_timeout", 30.0),
        timeout=s.number("timeout", 30.0, minimum=0.5),
        health_path=health,
        max_requests=max_requests,
        max_requests_jitter=s.number("max_requests_jitter", max_requests // 20, integer=True),
        max_memory_mb=s.number("max_memory_mb", 0, integer=True),
        reload_batch=s.number("reload_batch", 1, minimum=1, integer=True),
        ready_timeout=s.number("ready_timeout", 60.0, minimum=0.5),
        keepalive_timeout=s.number("keepalive_timeout", 5.0, minimum=0.1),
        header_timeout=s.number("header_timeout", 10.0, minimum=0.1),
        forwarded_allow_ips=_forwarded_allow_ips(s),
        socket_mode=_socket_mode(s),
        access_log=access_log,
        preload_app=preload_app,
        env_file=env_file,
        env_file_values=tuple(env_file_values.items()),
    )


def _forwarded_allow_ips(s: _Section) -> tuple[str, ...] | None:
    if not s.has("forwarded_allow_ips"):
        return None
    value = s.table["forwarded_allow_ips"]
    if value == "*" or value == ["*"]:
        return ("*",)
    usage = 'expected "*" or a list of IP addresses and networks, like ["127.0.0.1", "10.0.0.0/8"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or "*" in value:
        raise s.fail("forwarded_allow_ips", f"{usage}, got {value!r}")
    for host in value:
        # uvicorn would take anything else as a literal that no peer address ever equals: refused
        # here, so a typo cannot quietly turn the proxy's headers off.
        try:
            if "/" in host:
                ipaddress.ip_network(host)
            else:
                ipaddress.ip_address(host)
        except ValueError as exc:
            raise s.fail("forwarded_allow_ips", f"{usage}; {host!r} is not one ({exc})") from None
    return tuple(value)


def _socket_mode(s: _Section) -> int:
    value = s.table.get("socket_mode", "0660")
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{1,4}", value):
        # Not a TOML integer: 660 would be read as decimal, which is not the mode anyone means.
        raise s.fail("socket_mode", f'expected an octal string of up to 4 digits, like "0660", got {value!r}')
    return int(value, 8)


def _env_file(s: _Section, here: Path) -> tuple[Path | None, dict[str, str]]:
    raw = s.string("env_file", None)
    if raw is None:
        return None, {}
    if "\0" in raw:
        raise s.fail("env_file", "a path cannot contain a NUL byte")
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # ~user that does not exist
        raise s.fail("env_file", str(exc)) from None
    path = here / path
    try:
        return path, read_env_file(path)
    except ConfigError as exc:
        raise s.fail("env_file", str(exc)) from None


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of an env file, read as python-dotenv reads `.env` (quotes, `export`, ${VAR}).

    A name with no `=` has no value to add and is left out. ConfigError names the file.
    """
    from dotenv import dotenv_values  # only for a config that has an env_file

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {path}: the file is not UTF-8") from None
    values = {key: value for key, value in dotenv_values(stream=io.StringIO(text)).items() if value is not None}
    for key, value in values.items():
        # An environment cannot hold these; the spawn of every worker would fail on them.
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ConfigError(f"{path}: {key!r} cannot be an environment variable (a NUL byte, or = in its name)")
    return values


def is_import_target(target: str) -> bool:
    module, _, attr = target.partition(":")
    names = module.split(".") + attr.split(".")
    return bool(module and attr) and all(name.isidentifier() for name in names)


def parse_workers(value: Any, where: str = "workers") -> int:
    if value == "auto":
        return usable_cpus()
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f'{where}: expected "auto" or a whole number from 1 to {MAX_WORKERS}, got {value!r}')
    return value


def parse_bind(bind: str) -> tuple[str, int] | str:
    """`host:port` → (host, port); `unix:/path` → path. Raises ConfigError."""
    if bind.startswith("unix:"):
        path = bind[len("unix:") :]
        if not path:
            raise ConfigError(f"expected unix:/path/to.sock, got {bind!r}")
        return path
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT (like 127.0.0.1:8000) or unix:/path, got {bind!r}")
    return host, int(port)


def _store(s: _Section, overrides: dict[str, Any], cwd: Path) -> StoreConfig:
    raw = overrides.get("db") or s.string("path", str(StoreConfig.path))
    assert raw is not None
    where = "--db" if overrides.get("db") else f"{s.where} path"
    if "\0" in raw:
        raise ConfigError(f"{where}: a path cannot contain a NUL byte")
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # ~user that does not exist
        raise ConfigError(f"{where}: {exc}") from None
    if not path.is_absolute():
        path = cwd / path
    return StoreConfig(
        path=path,
        keep_runs=s.number("keep_runs", 1000, minimum=1, integer=True),
        keep_days=s.number("keep_days", 30.0, minimum=0.001),
        url=_store_url(s),
    )


def _store_url(s: _Section) -> str | None:
    if not s.has("url"):
        return None
    url = s.table["url"]
    if not isinstance(url, str) or not is_url(url):
        # Named without its value: a URL carries its password.
        raise s.fail("url", 'expected a PostgreSQL URL, like "postgresql://app@db.internal/app"')
    if importlib.util.find_spec("psycopg") is None:
        raise s.fail("url", "PostgreSQL needs psycopg: pip install 'clusterctl-tui[postgres]'")
    return url


def _metrics(s: _Section, server: ServerConfig) -> MetricsConfig:
    bind = s.string("bind", None)
    if bind is None:
        return MetricsConfig()
    # Prometheus scrapes over TCP, and an operator must know the port to point it at: no unix:, no port 0.
    try:
        target = None if bind.startswith("unix:") else parse_bind(bind)
    except ConfigError:
        target = None
    if not isinstance(target, tuple) or target[1] == 0:
        raise s.fail("bind", f"expected HOST:PORT with a port from 1 to 65535, like 127.0.0.1:9464, got {bind!r}")
    if bind == server.bind:
        raise s.fail("bind", f"{bind} is the app's own bind ([server] bind); pick another port")
    return MetricsConfig(bind=bind)


def _list_of_tables(label: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{label}: {key} must be an array of tables ([[{key}]])")
    return value


def _named_tables(label: str, key: str, raw: Any, known: set[str]) -> Iterator[tuple[_Section, str]]:
    """Each table of an array like [[jobs]], with its unique `name` checked."""
    seen: set[str] = set()
    for index, table in enumerate(_list_of_tables(label, key, raw)):
        name = table.get("name") if isinstance(table, dict) else None
        shown = repr(name) if isinstance(name, str) and name else f"#{index + 1}"
        s = _Section(f"{label}: [[{key}]] {shown}", table, known)
        name = s.string("name", None)
        if name is None:
            raise s.fail("name", "missing")
        if name in seen:
            raise s.fail("name", f"duplicate {key[:-1]} name {name!r}")
        seen.add(name)
        yield s, name


def _jobs(label: str, raw: Any) -> tuple[JobConfig, ...]:
    from . import cron  # croniter costs a CLI command 14 ms: only a config with jobs pays it

    jobs: list[JobConfig] = []
    for s, name in _named_tables(label, "jobs", raw, _JOB):
        table = s.table
        schedule = s.string("schedule", None)
        if schedule is None:
            raise s.fail("schedule", "missing")
        if not cron.is_valid(schedule):
            raise s.fail(
                "schedule",
                f"not a valid cron expression (5 fields, 6 with seconds first, or @hourly, @daily, @weekly, "
                f"@monthly, @yearly): {schedule!r}",
            )
        if not cron.ever_fires(schedule):
            # Refused here, not at the first slot: the primary would start and the job would never run.
            raise s.fail("schedule", f"{schedule!r} never fires: no date matches it")
        timezone = s.string("timezone", "UTC")
        assert timezone is not None
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise s.fail("timezone", f"unknown time zone {timezone!r}") from None
        kinds = [key for key in ("command", "call", "http") if s.has(key)]
        if len(kinds) != 1:
            raise s.fail("command", f"exactly one of command / call / http is required, got {kinds or 'none'}")
        call = s.string("call", None)
        if call is not None and not is_import_target(call):
            raise s.fail("call", f"expected MODULE:FUNCTION, like myapp.tasks:cleanup, got {call!r}")
        http = table.get("http")
        if http is not None and (not isinstance(http, dict) or not isinstance(http.get("url"), str)):
            raise s.fail("http", 'expected a table with at least url = "http://..."')
        jobs.append(
            JobConfig(
                name=name,
                schedule=schedule,
                timezone=timezone,
                command=s.argv("command"),
                call=call,
                http=http,
                timeout=s.number("timeout", 600.0, minimum=0.001),
                overlap=s.string("overlap", "skip", ("skip", "allow", "replace")) or "skip",
                catch_up=s.string("catch_up", "latest", ("none", "latest", "all")) or "latest",
                retries=s.number("retries", 0, integer=True),
                jitter=s.number("jitter", 0.0),
            )
        )
    return tuple(jobs)


def _webhooks(label: str, raw: Any) -> tuple[WebhookConfig, ...]:
    hooks: list[WebhookConfig] = []
    for s, name in _named_tables(label, "webhooks", raw, _WEBHOOK):
        table = s.table
        url = s.string("url", None)
        if url is None or not url.startswith(("http://", "https://")):
            raise s.fail("url", "expected an http:// or https:// URL")
        events = table.get("events", ["*"])
        if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
            raise s.fail("events", "expected a non-empty list of event names or prefix.* patterns")
        secret = table.get("secret", "")
        if not isinstance(secret, str):
            # Never echo the value: it may be the secret itself.
            raise s.fail("secret", "expected a string (env:NAME, file:PATH or whsec_...)")
        hooks.append(
            WebhookConfig(
                name=name,
                url=url,
                events=tuple(events),
                secret=secret,
                max_attempts=s.number("max_attempts", 8, minimum=1, integer=True),
                timeout=s.number("timeout", 10.0, minimum=0.001),
                concurrency=s.number("concurrency", 4, minimum=1, integer=True),
                retry_base=s.number("retry_base", 2.0, minimum=0.01),
            )
        )
    return tuple(hooks)
