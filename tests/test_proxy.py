"""Behind a proxy, on a socket: forwarded headers, the unix socket's mode, the access log, env_file."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, wait_for

from runtime.config import ConfigError, load_settings
from runtime.listeners import bind

FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX socket, as nginx's `proxy_pass http://unix:/path:` connects."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def echo(conn: http.client.HTTPConnection, headers: dict[str, str] | None = None, path: str = "/") -> dict[str, Any]:
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def tcp(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=5)


# ---------------------------------------------------------------- forwarded_allow_ips


def test_a_proxy_on_loopback_is_trusted_by_default(start_cluster):
    cluster = start_cluster(app="proxy_app:app", workers=1)
    seen = echo(tcp(cluster.port), FORWARDED)
    assert seen == {"scheme": "https", "client": ["203.0.113.7", 0]}
    plain = echo(tcp(cluster.port))
    assert plain["scheme"] == "http" and plain["client"][0] == "127.0.0.1"


def test_forwarded_allow_ips_from_the_config_decides_whom_to_trust(start_cluster):
    # The config is the one source once it names the key: uvicorn's FORWARDED_ALLOW_IPS no longer decides.
    cluster = start_cluster(
        app="proxy_app:app",
        workers=1,
        config='[server]\nforwarded_allow_ips = ["10.0.0.1"]\n',
        env={"FORWARDED_ALLOW_IPS": "*"},
    )
    seen = echo(tcp(cluster.port), FORWARDED)
    assert seen["scheme"] == "http"
    assert seen["client"][0] == "127.0.0.1"


def test_a_unix_bind_trusts_its_proxy_and_judges_the_hops_it_reports(start_cluster, tmp_path):
    path = tmp_path / "app.sock"
    cluster = start_cluster(
        "--bind",
        f"unix:{path}",
        app="proxy_app:app",
        workers=1,
        config='[server]\nforwarded_allow_ips = ["10.0.0.1"]\n',
    )
    # The socket's peer (nginx) is trusted although it has no address; the hops it reports are not,
    # unless forwarded_allow_ips names them: the client is the first untrusted hop from the right.
    assert echo(UnixHTTPConnection(path), FORWARDED) == {"scheme": "https", "client": ["203.0.113.7", 0]}
    spoofed = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7", "X-Forwarded-Proto": "https"}
    assert echo(UnixHTTPConnection(path), spoofed)["client"] == ["203.0.113.7", 0]
    via_trusted_hop = {"X-Forwarded-For": "198.51.100.9, 10.0.0.1"}
    assert echo(UnixHTTPConnection(path), via_trusted_hop)["client"] == ["198.51.100.9", 0]
    assert echo(UnixHTTPConnection(path)) == {"scheme": "http", "client": None}
    assert cluster.proc.poll() is None


# ---------------------------------------------------------------- socket_mode


def test_a_unix_bind_socket_file_is_0660_by_default(start_cluster, tmp_path):
    path = tmp_path / "app.sock"
    start_cluster("--bind", f"unix:{path}", app="proxy_app:app", workers=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_a_unix_bind_socket_file_gets_the_configured_mode(start_cluster, tmp_path):
    path = tmp_path / "app.sock"
    start_cluster("--bind", f"unix:{path}", app="proxy_app:app", workers=1, config='[server]\nsocket_mode = "0600"\n')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_binder_gives_a_unix_socket_file_its_mode(tmp_path):
    listener = bind(f"unix:{tmp_path / 'b.sock'}", socket_mode=0o640)
    try:
        assert stat.S_IMODE((tmp_path / "b.sock").stat().st_mode) == 0o640
    finally:
        listener.close()


# ---------------------------------------------------------------- access_log

ACCESS_LINE = re.compile(r'w1\[\d+\] out\| 127\.0\.0\.1:\d+ - "GET /logged\?n=1 HTTP/1\.1" 200')


def _requests_then_mark(port: int, log: Path) -> str:
    """A request, then a marker line from the app: workers.log as it stands once the marker is in.

    The worker writes a request's access line to stdout before its response, and the marker goes
    to the same stdout afterwards, so a line that is not there by the marker never comes.
    """
    echo(tcp(port), path="/logged?n=1")
    echo(tcp(port), path="/mark?done")
    return wait_for(lambda: log.exists() and "mark done" in (text := log.read_text()) and text, 10, "the mark")


def test_access_log_writes_a_line_per_request_to_workers_log(start_cluster):
    cluster = start_cluster(app="proxy_app:app", workers=1, config="[server]\naccess_log = true\n")
    log = _requests_then_mark(cluster.port, cluster.db.parent / "logs" / "workers.log")
    assert ACCESS_LINE.search(log), log
    # ... and, like the workers' other output, on the headless primary's stderr.
    wait_for(lambda: re.search(r'"GET /mark\?done HTTP/1\.1" 200', cluster.output()), 10, "the echoed line")


def test_no_access_log_by_default(start_cluster):
    cluster = start_cluster(app="proxy_app:app", workers=1)
    log = _requests_then_mark(cluster.port, cluster.db.parent / "logs" / "workers.log")
    assert "GET /logged" not in log


# ---------------------------------------------------------------- env_file


def _worker_environ(cluster) -> dict[str, str]:
    pid = cluster.ready_workers()[0]["pid"]
    return psutil.Process(pid).environ()


def test_env_file_values_reach_the_workers_and_a_reload_rereads_it(start_cluster, tmp_path):
    env_file = tmp_path / "app.env"
    env_file.write_text(
        'GREETING=hello\nexport QUOTED="two words"\nFROM_PRIMARY=file\nCLUSTERCTL_WORKER_ID=99\nNO_VALUE\n'
    )
    cluster = start_cluster(
        app="proxy_app:app", workers=1, config='[server]\nenv_file = "app.env"\n', env={"FROM_PRIMARY": "primary"}
    )
    environ = _worker_environ(cluster)
    assert environ["GREETING"] == "hello"
    assert environ["QUOTED"] == "two words"
    assert environ["FROM_PRIMARY"] == "primary"  # the primary's own environment wins, as with load_dotenv()
    assert environ["CLUSTERCTL_WORKER_ID"] == "1"  # the cluster's variables are not the file's to change
    assert "NO_VALUE" not in environ

    env_file.write_text("GREETING=bonjour\n")
    result = cluster.cli("reload")
    assert result.returncode == 0, result.stderr
    environ = _worker_environ(cluster)
    assert environ["GREETING"] == "bonjour"
    assert "QUOTED" not in environ


def test_a_respawn_with_the_env_file_gone_gets_the_values_read_at_start(start_cluster, tmp_path):
    env_file = tmp_path / "app.env"
    env_file.write_text("GREETING=hello\n")
    cluster = start_cluster(app="proxy_app:app", workers=1, config='[server]\nenv_file = "app.env"\n')
    victim = cluster.ready_workers()[0]["pid"]
    env_file.unlink()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: [w for w in cluster.ready_workers() if w["pid"] != victim], 15, "the respawned worker")
    assert _worker_environ(cluster)["GREETING"] == "hello"
    assert f"cannot read {env_file}" in cluster.output()


def test_env_file_is_found_beside_the_config_file(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / ".env").write_text("API_TOKEN=s3cr3t-token\n")
    (conf / "clusterctl.toml").write_text('[server]\nenv_file = ".env"\n')
    settings = load_settings(conf / "clusterctl.toml", cwd=tmp_path)
    assert settings.server.env_file == conf / ".env"
    assert settings.server.env_file_values == (("API_TOKEN", "s3cr3t-token"),)
    assert "s3cr3t-token" not in repr(settings)  # values may be secrets: never in a repr


def test_a_missing_env_file_stops_the_start_with_one_line_naming_it(tmp_path):
    (tmp_path / "clusterctl.toml").write_text('[server]\nenv_file = "missing.env"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERCTL_")}
    args = ["up", "--headless", "--workers", "1", "--bind", f"127.0.0.1:{free_port()}", "--db", "state.db"]
    result = subprocess.run(
        [sys.executable, "-m", "runtime", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "missing.env") in lines[0] and "env_file" in lines[0], result.stderr


# ---------------------------------------------------------------- the config


# The lines of DESIGN.md's [server] sample that this file is about, verbatim: they are the contract.
DESIGN_SERVER_KEYS = """
[server]
forwarded_allow_ips = ["127.0.0.1"]  # trust X-Forwarded-For/-Proto from these ("*" for any)
socket_mode = "0660"           # permissions of a unix: bind's socket file
access_log = false             # one line per request in the workers' output
env_file = ".env"              # optional: KEY=VALUE lines added to the app's environment
"""


def test_the_design_server_keys_load(tmp_path):
    (tmp_path / ".env").write_text("")
    (tmp_path / "clusterctl.toml").write_text(DESIGN_SERVER_KEYS)
    server = load_settings(cwd=tmp_path).server
    assert server.forwarded_allow_ips == ("127.0.0.1",)
    assert server.socket_mode == 0o660
    assert server.access_log is False
    assert server.env_file == tmp_path / ".env"


def test_defaults(tmp_path):
    server = load_settings(cwd=tmp_path).server
    assert server.forwarded_allow_ips is None  # uvicorn's own default: FORWARDED_ALLOW_IPS, else loopback
    assert server.socket_mode == 0o660
    assert server.access_log is False
    assert server.env_file is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"*"', ("*",)),
        ('["*"]', ("*",)),
        ('["10.0.0.0/8", "::1", "192.168.1.5"]', ("10.0.0.0/8", "::1", "192.168.1.5")),
    ],
)
def test_forwarded_allow_ips_values(tmp_path, value, expected):
    (tmp_path / "clusterctl.toml").write_text(f"[server]\nforwarded_allow_ips = {value}\n")
    assert load_settings(cwd=tmp_path).server.forwarded_allow_ips == expected


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('forwarded_allow_ips = "10.0.0.1"', "forwarded_allow_ips"),
        ('forwarded_allow_ips = ["nginx"]', "'nginx'"),
        ('forwarded_allow_ips = ["10.0.0.1/8"]', "host bits"),
        ('forwarded_allow_ips = ["*", "10.0.0.1"]', "forwarded_allow_ips"),
        ("forwarded_allow_ips = [1]", "forwarded_allow_ips"),
        ('socket_mode = "0999"', "socket_mode"),
        ('socket_mode = "rw-rw----"', "socket_mode"),
        ('socket_mode = "00660"', "socket_mode"),
        ("socket_mode = 660", "octal string"),
        ('access_log = "yes"', "access_log"),
        ('env_file = ""', "env_file"),
        ('env_file = "nope.env"', "nope.env"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, line, needle):
    (tmp_path / "clusterctl.toml").write_text(f"[server]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=tmp_path)
    message = str(info.value)
    assert "\n" not in message and needle in message and "[server]" in message, message
