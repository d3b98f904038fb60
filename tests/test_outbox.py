"""The wire format and the outbox, without processes."""

from __future__ import annotations

import base64
import sqlite3
import threading

import pytest

from runtime.outbox import SecretError, body_for, emit, matches, resolve_secret, sign
from runtime.store import Store

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_signature_matches_the_standard_webhooks_test_vector():
    key = resolve_secret(SPEC_SECRET, "spec")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_secret_references_resolve_and_never_echo_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SPEC_SECRET)
    assert resolve_secret("env:HOOK_SECRET", "ops") == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SPEC_SECRET + "\n")
    assert resolve_secret(f"file:{secret_file}", "ops") == resolve_secret(SPEC_SECRET, "ops")
    for reference, needle in [
        ("env:NOT_SET_ANYWHERE", "env:NOT_SET_ANYWHERE"),
        (f"file:{tmp_path / 'missing'}", "missing"),
        ("hunter2-not-whsec", "whsec_"),
        ("whsec_!!!notbase64", "base64"),
    ]:
        with pytest.raises(SecretError) as info:
            resolve_secret(reference, "ops")
        assert needle in str(info.value) and "'ops'" in str(info.value)
        assert "hunter2" not in str(info.value) and "!!!notbase64" not in str(info.value)


@pytest.mark.parametrize(
    "patterns, kind, expected",
    [
        (["worker.*"], "worker.crashed", True),
        (["worker.*"], "workers.crashed", False),
        (["job.failed"], "job.failed", True),
        (["job.failed"], "job.succeeded", False),
        (["*"], "anything.at.all", True),
        (["app.*"], "app.order.created", True),
    ],
)
def test_event_filters(patterns, kind, expected):
    assert matches(patterns, kind) is expected


def test_body_is_the_documented_envelope():
    import json

    body = json.loads(body_for("app.x", "2026-01-01T00:00:00.000Z", '{"a":1}'))
    assert body == {"type": "app.x", "timestamp": "2026-01-01T00:00:00.000Z", "data": {"a": 1}}


def test_emit_writes_event_and_deliveries_in_one_transaction_from_many_threads(tmp_path):
    db = tmp_path / "state.db"
    store = Store(db)
    store.sync_endpoints(
        [
            {"name": "all", "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 3},
            {"name": "orders", "url": "http://127.0.0.1:9/", "events": ["app.order.*"], "max_attempts": 3},
        ]
    )
    ids: list[str] = []
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(50):
                ids.append(emit("app.order.created" if i % 2 else "app.user.created", {"n": n, "i": i}, db=db))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 400 and all(i.startswith("msg_") for i in ids)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0] == 400
    per_endpoint = dict(conn.execute("SELECT endpoint, COUNT(*) FROM webhook_deliveries GROUP BY endpoint"))
    assert per_endpoint == {"all": 400, "orders": 200}
    assert conn.execute("SELECT COUNT(*) FROM webhook_deliveries WHERE status != 'pending'").fetchone()[0] == 0


def test_emit_refuses_what_it_cannot_store(tmp_path, monkeypatch):
    monkeypatch.delenv("CLUSTERCTL_DB", raising=False)
    with pytest.raises(RuntimeError, match="CLUSTERCTL_DB"):
        emit("app.x", {})
    with pytest.raises(TypeError):
        emit("app.x", {"not json": object()}, db=tmp_path / "s.db")


def test_webhook_retention_drops_old_finished_deliveries_and_their_events(tmp_path):
    store = Store(tmp_path / "state.db")
    store.sync_endpoints([{"name": "a", "url": "http://127.0.0.1:9/", "events": ["*"], "max_attempts": 3}])
    for i in range(3):
        store.emit(f"msg_old{i}", "app.x", "{}", ["a"])
    store.emit("msg_new", "app.x", "{}", ["a"])
    store.emit("msg_pending", "app.x", "{}", ["a"])
    store.conn.execute("UPDATE webhook_deliveries SET status = 'delivered' WHERE event_id != 'msg_pending'")
    store.conn.execute("UPDATE webhook_events SET created_at = '2000-01-01T00:00:00.000Z' WHERE id LIKE 'msg_old%'")
    store.conn.execute(
        "UPDATE webhook_deliveries SET created_at = '2000-01-01T00:00:00.000Z' WHERE event_id LIKE 'msg_old%'"
    )
    store.prune_webhooks(keep_days=1)
    events = {row[0] for row in store.conn.execute("SELECT id FROM webhook_events")}
    assert events == {"msg_new", "msg_pending"}
    statuses = sorted(row[0] for row in store.conn.execute("SELECT status FROM webhook_deliveries"))
    assert statuses == ["delivered", "pending"]
