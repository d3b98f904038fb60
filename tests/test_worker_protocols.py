"""What a worker does with the connections it serves: WebSockets in a drain, request bodies, idle sockets.

Real primaries and workers on 127.0.0.1, as in test_cluster; every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
from typing import Any

import psutil
import pytest
from conftest import Load, get, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runtime.channel import EXIT_BOOT_ERROR

GRACEFUL_TIMEOUT = 30


def _worker_log(cluster: Any) -> str:
    """The workers' output lines, as the primary wrote them to logs/workers.log beside the store."""
    path = cluster.db.parent / "logs" / "workers.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _exit_event(cluster: Any, pid: int) -> dict[str, Any] | None:
    events = [e for e in cluster.worker_events() if e["pid"] == pid and e["event"] in ("exited", "killed", "crashed")]
    return events[0] if events else None


@pytest.mark.parametrize("path", ["/ws", "/broadcast"])
@pytest.mark.parametrize("action", ["reload", "stop"])
def test_drain_closes_websockets_with_a_close_code_and_runs_lifespan_shutdown(start_cluster, tmp_path, action, path):
    marker = tmp_path / "shutdown-pids"
    cluster = start_cluster(
        app="ws_app:app",
        workers=1,
        config=f"[server]\ngraceful_timeout = {GRACEFUL_TIMEOUT}\n",
        env={"TEST_SHUTDOWN_MARKER": str(marker)},
    )
    with connect(f"ws://127.0.0.1:{cluster.port}{path}", open_timeout=5) as ws:
        pid = json.loads(ws.recv(timeout=5))["pid"]
        if path == "/ws":
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"

        outcome: dict[str, Any] = {}

        def run_action() -> None:
            outcome["result"] = cluster.cli(action)
            outcome["at"] = time.monotonic()

        started = time.monotonic()
        thread = threading.Thread(target=run_action, daemon=True)
        thread.start()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        closed_after = time.monotonic() - started
    thread.join(GRACEFUL_TIMEOUT + 15)
    assert closed.value.rcvd is not None, "the worker went away without a close frame"
    assert closed.value.rcvd.code in (1001, 1012)
    assert closed_after < 10
    assert outcome["result"].returncode == 0, outcome["result"].stderr
    assert outcome["at"] - started < GRACEFUL_TIMEOUT / 3
    wait_for(lambda: marker.exists() and str(pid) in marker.read_text().split(), 10, "lifespan shutdown in the worker")
    event = wait_for(lambda: _exit_event(cluster, pid), 10, "the worker's exit recorded")
    assert event["event"] == "exited", event
    if action == "stop":
        assert cluster.proc.wait(10) == 0
    assert "Traceback" not in cluster.output() + _worker_log(cluster)


def _post(port: int, path: str, body: bytes, *, chunked: bool) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/octet-stream")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            step = 65_521  # not a power of two: chunk edges fall anywhere in the server's reads
            for start in range(0, len(body), step):
                chunk = body[start : start + step]
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.send(body)
        response = conn.getresponse()
        assert response.status == 200, (response.status, response.read()[:500])
        return json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize(("app", "path"), [("flask_app:app", "/digest"), ("wsgi_app:app", "/")])
def test_wsgi_apps_read_every_byte_of_chunked_and_sized_bodies(start_cluster, app, path):
    cluster = start_cluster(app=app, workers=1)
    payload = random.Random(7).randbytes(3 * 1024 * 1024)
    for size in (0, 1, 64 * 1024, len(payload)):
        body = payload[:size]
        expected = {"length": size, "sha256": hashlib.sha256(body).hexdigest()}
        for chunked in (True, False):
            assert _post(cluster.port, path, body, chunked=chunked) == expected, (size, chunked)


def test_wsgi_app_sees_an_error_not_a_short_body_when_the_client_leaves_mid_body(start_cluster):
    cluster = start_cluster(app="wsgi_app:app", workers=1)
    heads = {
        "sized": b"Content-Length: 1000000\r\n\r\n" + b"x" * 100_000,
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n" + b"186a0\r\n" + b"x" * 100_000 + b"\r\n",
    }
    for framing, rest in heads.items():
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + rest)
        failures = 1 if framing == "sized" else 2
        wait_for(
            lambda: _worker_log(cluster).count("reading the body failed") == failures,  # noqa: B023
            10,
            f"the app to see the {framing} body end in an error",
        )
    assert "read 100000 bytes" not in _worker_log(cluster)


def test_connections_that_send_no_request_head_are_closed(start_cluster, tmp_path):
    cluster = start_cluster(
        app="ws_app:app",
        workers=2,
        config="[server]\nheader_timeout = 1\n",
        env={"TEST_SHUTDOWN_MARKER": str(tmp_path / "shutdown-pids")},
    )
    address = ("127.0.0.1", cluster.port)
    slow: list[int] = []
    slow_request = threading.Thread(target=lambda: slow.append(get(cluster.port, "/sleep?2.5", 10)[0]), daemon=True)
    slow_request.start()
    with connect(f"ws://127.0.0.1:{cluster.port}/ws", open_timeout=5) as ws, Load(cluster.port, clients=2) as load:
        assert "pid" in json.loads(ws.recv(timeout=5))
        silent = [socket.create_connection(address, timeout=10) for _ in range(40)]
        partial = [socket.create_connection(address, timeout=10) for _ in range(10)]
        for sock in partial:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head that never ends
        opened = time.monotonic()
        try:
            for sock in silent + partial:
                assert sock.recv(1) == b""
        finally:
            for sock in silent + partial:
                sock.close()
        closed_after = time.monotonic() - opened
        load.wait_requests(50)
        slow_request.join(10)
        # Open for longer than the header timeout, and still served.
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
    assert closed_after < 8
    assert slow == [200]
    assert load.failures == [], load.failures[:5]


def test_accept_backs_off_when_the_worker_runs_out_of_file_descriptors(start_cluster):
    cluster = start_cluster(workers=1, config="[server]\nheader_timeout = 2\n")
    assert get(cluster.port)[0] == 200
    worker = psutil.Process(cluster.status()["workers"][0]["pid"])
    spare = 8
    worker.rlimit(psutil.RLIMIT_NOFILE, (worker.num_fds() + spare, worker.rlimit(psutil.RLIMIT_NOFILE)[1]))
    # More than it can hold: the rest wait in the backlog until the header timeout frees the first ones.
    idle = [socket.create_connection(("127.0.0.1", cluster.port), timeout=10) for _ in range(spare + 4)]
    try:
        wait_for(lambda: "accept failed" in _worker_log(cluster), 10, "the worker to run out of file descriptors")
        wait_for(lambda: get(cluster.port)[0] == 200, 20, "the worker serving again")
        wait_for(lambda: "accepting again" in _worker_log(cluster), 5, "the end of the back-off reported")
    finally:
        for sock in idle:
            sock.close()
    failed = [line for line in _worker_log(cluster).splitlines() if "accept failed" in line]
    assert len(failed) == 1, failed[:5]
    assert "Errno 24" in failed[0]


def test_app_that_breaks_its_listening_socket_at_import_fails_to_boot(start_cluster, tmp_path):
    flag = tmp_path / "break"
    flag.touch()
    for mode in ("close", "replace"):
        cluster = start_cluster(
            app="closes_listener_app:app",
            workers=1,
            wait=False,
            env={"TEST_BREAK_FLAG": str(flag), "TEST_BREAK_MODE": mode},
            db=tmp_path / f"{mode}.db",
        )
        assert cluster.proc.wait(30) != 0, cluster.output()
        assert "closed or replaced listening socket fd" in cluster.output(), cluster.output()
        crashed = [e for e in cluster.worker_events() if e["event"] == "crashed"]
        assert crashed and "closed or replaced listening socket fd" in crashed[0]["reason"], crashed
        assert crashed[0]["exit_code"] == EXIT_BOOT_ERROR  # the primary backs off instead of retrying hot


def test_reload_to_an_app_that_breaks_its_listening_socket_rolls_back(start_cluster, tmp_path):
    flag = tmp_path / "break"
    cluster = start_cluster(
        app="closes_listener_app:app", workers=1, env={"TEST_BREAK_FLAG": str(flag), "TEST_BREAK_MODE": "replace"}
    )
    before = cluster.status()["workers"][0]["pid"]
    flag.touch()
    result = cluster.cli("reload")
    assert result.returncode == 1, result
    assert "closed or replaced listening socket fd" in result.stderr
    assert [w["pid"] for w in cluster.wait_ready(1)] == [before]
    assert get(cluster.port)[0] == 200


# ---------------------------------------------------------------- the write path (runtime.coalesce)


def _worker_pid(cluster: Any) -> int:
    return cluster.ready_workers()[0]["pid"]


def test_a_small_response_leaves_the_worker_in_one_write(start_cluster):
    """Head and body in one write(2): uvicorn writes them apart, and with TCP_NODELAY each is a packet."""
    cluster = start_cluster(app="stream_app:app", workers=1)
    worker = psutil.Process(_worker_pid(cluster))
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"ok"
    requests = 2000
    before = worker.io_counters().write_count
    for _ in range(requests):
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
    writes = worker.io_counters().write_count - before
    conn.close()
    # One per response, plus the heartbeats the worker sends the primary meanwhile.
    assert writes < requests * 1.2, f"{writes} writes for {requests} responses"


def test_a_body_sent_without_pausing_still_meets_back_pressure(start_cluster):
    """Gathered writes are sent once 64 KiB are waiting, so a client that does not read holds the app up.

    Without that, the worker would hold the whole 256 MiB body in memory until the loop next ran.
    """
    cluster = start_cluster(app="stream_app:app", workers=1)
    worker = psutil.Process(_worker_pid(cluster))
    baseline = worker.memory_info().rss
    chunks = 256
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /big?{chunks} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        peak = 0
        deadline = time.monotonic() + 1.5  # the client reads nothing meanwhile
        while time.monotonic() < deadline:
            peak = max(peak, worker.memory_info().rss - baseline)
            time.sleep(0.05)
        assert peak < 64 * 1024 * 1024, f"the worker grew {peak >> 20} MiB with a client that reads nothing"
        # Then every byte arrives, in order.
        received = bytearray()
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        digest, count = hashlib.sha256(), 0
        pending = body
        while True:
            # chunked: size line, data, CRLF; the last chunk has size 0
            while b"\r\n" not in pending:
                pending += sock.recv(1 << 20)
            size_line, _, pending = pending.partition(b"\r\n")
            size = int(size_line, 16)
            while len(pending) < size + 2:
                pending += sock.recv(1 << 20)
            if size == 0:
                break
            digest.update(pending[:size])
            count += size
            pending = pending[size + 2 :]
    expected = hashlib.sha256()
    for index in range(chunks):
        expected.update(bytes([index % 256]) * (1024 * 1024))
    assert count == chunks * 1024 * 1024
    assert digest.hexdigest() == expected.hexdigest()


def test_a_streamed_chunk_is_sent_when_the_app_sends_it(start_cluster):
    """Writes are gathered only until the loop next runs: a chunk is not held back for the next one."""
    cluster = start_cluster(app="stream_app:app", workers=1)
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as sock:
        sock.sendall(b"GET /ticks HTTP/1.1\r\nHost: t\r\n\r\n")
        started = time.monotonic()
        received = b""
        while b"tick" not in received:
            received += sock.recv(4096)
        first = time.monotonic() - started
        while b"tock" not in received:
            received += sock.recv(4096)
        second = time.monotonic() - started
    assert first < 0.5, f"the first chunk took {first:.2f}s"
    assert second >= 0.9


# ---------------------------------------------------------------- accepting (runtime.balance)


def _listening_descriptors(pid: int, port: int) -> int:
    """How many of the worker's descriptors are the shared listening socket (a duplicate counts too)."""
    listening = [
        c
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    target = os.readlink(f"/proc/{pid}/fd/{listening[0].fd}")  # socket:[inode]
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == target
    return count


def _one_connection_per_request(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/", headers={"Connection": "close"})
    assert conn.getresponse().read() == b"ok"
    conn.close()


def test_many_connections_a_second_that_do_not_last_are_accepted_by_uvloops_server(start_cluster):
    """Hundreds of connections a second, a request each: no stepping aside, and uvloop's server accepts
    (on a duplicate of the listening socket). Once they stop, back to the Python path, with balance."""
    cluster = start_cluster(app="stream_app:app", workers=1)
    pid = _worker_pid(cluster)
    assert _listening_descriptors(pid, cluster.port) == 1
    deadline = time.monotonic() + 10
    while _listening_descriptors(pid, cluster.port) == 1:
        assert time.monotonic() < deadline, "still accepting in Python under a connection per request"
        for _ in range(100):
            _one_connection_per_request(cluster.port)
    for _ in range(200):  # served as ever
        _one_connection_per_request(cluster.port)
    wait_for(lambda: _listening_descriptors(pid, cluster.port) == 1, 5, "accepting in Python again")
    assert get(cluster.port)[1] == b"ok"


def test_a_health_check_s_few_short_connections_leave_accepting_to_the_python_path(start_cluster):
    cluster = start_cluster(app="stream_app:app", workers=1)
    pid = _worker_pid(cluster)
    until = time.monotonic() + 2.5  # more than two looks at the rate
    while time.monotonic() < until:
        _one_connection_per_request(cluster.port)
        time.sleep(0.02)
        assert _listening_descriptors(pid, cluster.port) == 1
