"""Attachments that are never lost, never stuck, and bounded per user (issue 17 #3-#8, #10, #12).

Real parts: the SQL store on SQLite files, the disk storage in a temp dir, moto's S3
server process (``tests/s3.py``), real gunicorn for the disk-full case, and a
``flask chatkit prune`` subprocess for the time-zone case.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import sqlalchemy as sa
from botocore.config import Config
from flask import Flask, jsonify
from flask.testing import FlaskClient
from flask_login import LoginManager, login_user

from flask_chatkit import ChatKit, FileAttachmentStore
from flask_chatkit.cli import chatkit_cli
from flask_chatkit.storage import sql as sql_storage
from flask_chatkit.testing import ChatKitClient

from .apps import ScriptedServer, User, create_test_app
from .gunicorn import ROOT, free_port, start_gunicorn
from .helpers import login_as
from .http_client import logged_in_session, user_input
from .s3 import S3Server


def _disk_app(tmp_path: Path, **config: Any) -> Flask:
    return create_test_app(
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CHATKIT_ATTACHMENTS_DIR=str(tmp_path / "files"),
        **config,
    )


def _direct(web: FlaskClient, data: bytes, name: str = "a.txt") -> Any:
    return web.post(
        "/chatkit/attachments",
        data={"file": (io.BytesIO(data), name, "text/plain")},
        content_type="multipart/form-data",
    )


def _create(ck: ChatKitClient, size: int) -> Any:
    params = {"name": "a.txt", "size": size, "mime_type": "text/plain"}
    return ck.send({"type": "attachments.create", "params": params})


def _files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "files"
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if folder.exists() else []


def _rows(app: Flask) -> dict[str, Any]:
    store = app.extensions["chatkit"].store
    a = store.attachments
    with store.engine.connect() as conn:
        return {r.id: r.upload_state for r in conn.execute(sa.select(a.c.id, a.c.upload_state))}


# -- #3 rows linked to a thread that does not exist ------------------------------------


def test_prune_reclaims_attachments_of_a_thread_that_was_never_created(tmp_path: Path) -> None:
    app = _disk_app(tmp_path)
    web = login_as(app, "alice").client
    answer = _direct(web, b"orphan bytes")
    assert answer.status_code == 200
    orphan = answer.get_json()["id"]
    store = app.extensions["chatkit"].store
    a = store.attachments
    # What a failed user-message insert leaves: the row names its thread, the thread is not there.
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(a)
            .where(a.c.id == orphan)
            .values(thread_id="thr_never_created", created_at=datetime.now() - timedelta(days=2))
        )
    result = app.test_cli_runner().invoke(chatkit_cli, ["prune", "--older-than", "1"])
    assert result.exit_code == 0, result.output
    assert orphan in result.output and "1 unsent attachment(s)" in result.output
    assert _files(tmp_path) == []
    assert _rows(app) == {}


def _dead_s3_client(s3_server: S3Server) -> Any:
    """A boto3 client of a port nobody listens on: S3 is down for the storage using it."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name=s3_server.env["AWS_DEFAULT_REGION"],
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )


@contextmanager
def _s3_down(app: Flask, s3_server: S3Server) -> Iterator[None]:
    """S3 is down for the app's attachment storage while inside; back up afterwards."""
    storage = app.extensions["chatkit"].attachment_store.storage
    live_client = storage.client
    storage._client = _dead_s3_client(s3_server)
    try:
        yield
    finally:
        storage._client = live_client


def _sent(ck: ChatKitClient, data: bytes, text: str = "hi") -> tuple[str, str]:
    """Upload ``data`` directly and send it in a new thread: (attachment id, thread id)."""
    attachment_id = _direct(ck.client, data).get_json()["id"]
    events = ck.send(
        {"type": "threads.create", "params": {"input": user_input(text, [attachment_id])}}
    )
    return attachment_id, events[0].thread.id


# -- #4 a thread deleted while S3 is down ------------------------------------------------


def test_thread_deleted_while_s3_is_down_keeps_a_row_until_prune_removes_the_object(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    app = _disk_app(tmp_path, CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/p")
    ck = login_as(app, "alice")
    attachment_id, thread_id = _sent(ck, b"kept safe")
    assert s3_server.keys(s3_bucket) == [f"p/{attachment_id}"]

    with _s3_down(app, s3_server):
        assert ck.send({"type": "threads.delete", "params": {"thread_id": thread_id}}) == {}
        assert s3_server.keys(s3_bucket) == [f"p/{attachment_id}"]  # the object stays ...
        assert _rows(app) == {attachment_id: "deleted"}  # ... and a row still leads to it
        answer = ck.client.get(f"/chatkit/attachments/{attachment_id}/content")
        assert answer.status_code == 404  # gone for the user

        prune = app.test_cli_runner().invoke(chatkit_cli, ["prune", "--older-than", "1"])
        assert prune.exit_code == 0  # still down: nothing lost, the row stays
        assert _rows(app) == {attachment_id: "deleted"}

    # S3 is back.
    prune = app.test_cli_runner().invoke(chatkit_cli, ["prune", "--older-than", "1"])
    assert prune.exit_code == 0, prune.output
    assert s3_server.keys(s3_bucket) == []
    assert _rows(app) == {}


def test_the_next_successful_delete_removes_what_an_outage_left(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    app = _disk_app(tmp_path, CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/p")
    ck = login_as(app, "alice")
    threads = [_sent(ck, name.encode(), name)[1] for name in ("one", "two")]
    with _s3_down(app, s3_server):
        ck.send({"type": "threads.delete", "params": {"thread_id": threads[0]}})
        assert len(s3_server.keys(s3_bucket)) == 2
    ck.send({"type": "threads.delete", "params": {"thread_id": threads[1]}})
    assert s3_server.keys(s3_bucket) == []
    assert _rows(app) == {}


# -- #5 FileAttachmentStore(max_bytes=...) built with no storage ---------------------------


def test_attachment_store_without_storage_deletes_files_with_their_thread(tmp_path: Path) -> None:
    app = Flask("no_storage_app", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SECRET_KEY="s",
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CHATKIT_ATTACHMENTS_DIR=str(tmp_path / "files"),
        CHATKIT_ALLOWED_MIME_TYPES=["text/plain"],
    )
    login = LoginManager(app)
    login.user_loader(User)

    @app.post("/login/<user_id>")
    def login_view(user_id: str) -> Any:
        login_user(User(user_id))
        return jsonify(ok=True)

    ChatKit(app, ScriptedServer, attachment_store=FileAttachmentStore(max_bytes=1000))
    ck = login_as(app, "alice")
    web = ck.client
    attachment_id = _direct(web, b"to be deleted").get_json()["id"]
    events = ck.send(
        {"type": "threads.create", "params": {"input": user_input("x", [attachment_id])}}
    )
    assert _files(tmp_path) == [attachment_id]
    ck.send({"type": "threads.delete", "params": {"thread_id": events[0].thread.id}})
    assert _files(tmp_path) == []
    assert _rows(app) == {}


# -- #6 claims expire; a failed final write gives the claim back ---------------------------

FAIL_STATES = """
CREATE TRIGGER chatkit_test_fail BEFORE UPDATE OF upload_state ON chatkit_attachments
WHEN NEW.upload_state IN ({states}) BEGIN SELECT RAISE(ABORT, 'database failed'); END
"""
LOG_STATES = """
CREATE TRIGGER chatkit_test_log AFTER UPDATE OF upload_state ON chatkit_attachments
BEGIN INSERT INTO chatkit_test_states VALUES (NEW.upload_state); END
"""
TEST_TRIGGERS = ("chatkit_test_fail", "chatkit_test_log")


def _upload_raw(web: FlaskClient, attachment_id: str, data: bytes) -> Any:
    return web.put(
        f"/chatkit/attachments/{attachment_id}/upload", data=data, content_type="text/plain"
    )


def _failed_upload(app: Flask, web: FlaskClient, attachment_id: str, states: str) -> list[str]:
    """Upload while every write of ``states`` into upload_state fails (the database
    fails; a trigger's abort is a 500, an outage would be a 503). Returns the
    upload_states written meanwhile, in order. The triggers are gone afterwards,
    on every path."""
    engine = app.extensions["chatkit"].store.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE chatkit_test_states (state VARCHAR(16))")
        conn.exec_driver_sql(FAIL_STATES.format(states=states))
        conn.exec_driver_sql(LOG_STATES)
    try:
        answer = _upload_raw(web, attachment_id, b"12345")
    finally:
        with engine.begin() as conn:
            for trigger in TEST_TRIGGERS:
                conn.exec_driver_sql(f"DROP TRIGGER {trigger}")
            written = list(conn.exec_driver_sql("SELECT state FROM chatkit_test_states").scalars())
            conn.exec_driver_sql("DROP TABLE chatkit_test_states")
    assert answer.status_code in (500, 503), answer.get_data(as_text=True)
    return written


def test_failed_final_write_gives_the_claim_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim never goes stale here: only its release can let the retry below in.
    monkeypatch.setattr(sql_storage, "CLAIM_STALE_SECONDS", 10**9)
    app = _disk_app(tmp_path)
    ck = login_as(app, "alice")
    attachment = _create(ck, 5)
    written = _failed_upload(app, ck.client, attachment.id, "'done'")
    # The upload claimed the row, its final write ("done") failed, and the release
    # put the row back to pending (and removed the bytes it had written).
    assert len(written) == 2 and written[0].startswith("c:"), written
    assert written[1] == "pending", written
    assert _rows(app) == {attachment.id: "pending"}
    assert _files(tmp_path) == []
    # So the client's retry, right away, succeeds.
    answer = _upload_raw(ck.client, attachment.id, b"12345")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert _rows(app) == {attachment.id: "done"}
    ck.send({"type": "threads.create", "params": {"input": user_input("x", [attachment.id])}})


def test_a_stuck_claim_expires(tmp_path: Path) -> None:
    """The final write and the release both fail (the database went away), or the
    worker was killed: the claim stays, then goes stale and a retry takes it."""
    app = _disk_app(tmp_path)
    ck = login_as(app, "alice")
    web = ck.client
    store = app.extensions["chatkit"].store
    attachment = _create(ck, 5)
    written = _failed_upload(app, web, attachment.id, "'done', 'pending'")
    assert len(written) == 1 and written[0].startswith("c:"), written  # no release
    assert _rows(app) == {attachment.id: written[0]}
    assert _upload_raw(web, attachment.id, b"12345").status_code == 409  # a live claim holds
    # Two minutes later (the claim's time moved back: the clock is not patched).
    a = store.attachments
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(a)
            .where(a.c.id == attachment.id)
            .values(upload_state=sql_storage.claim_token(time.time() - 120))
        )
    answer = _upload_raw(web, attachment.id, b"12345")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    ck.send({"type": "threads.create", "params": {"input": user_input("x", [attachment.id])}})
    assert _rows(app)[attachment.id] == "done"


# -- #7 the pending-bytes quota ------------------------------------------------------------


def test_pending_bytes_are_bounded_per_user_and_freed_by_sending_or_deleting(
    tmp_path: Path,
) -> None:
    app = _disk_app(
        tmp_path, CHATKIT_MAX_ATTACHMENT_BYTES=2000, CHATKIT_MAX_PENDING_ATTACHMENT_BYTES=3000
    )
    ck = login_as(app, "alice")
    web = ck.client
    first = _direct(web, b"a" * 1500).get_json()["id"]
    second = _direct(web, b"b" * 1500).get_json()["id"]
    refused = _direct(web, b"c")
    assert refused.status_code == 413
    error = refused.get_json()["error"]
    assert error["code"] == "payload_too_large"
    assert "CHATKIT_MAX_PENDING_ATTACHMENT_BYTES" in error["message"] and "3000" in error["message"]
    two_phase = _create(ck, 100)
    answer = _upload_raw(web, two_phase.id, b"x" * 100)
    assert answer.status_code == 413 and "3000" in answer.get_json()["error"]["message"]
    assert sorted(_files(tmp_path)) == sorted([first, second])
    # Another user is not affected.
    assert _direct(login_as(app, "bob").client, b"d" * 1500).status_code == 200

    ck.send({"type": "threads.create", "params": {"input": user_input("x", [first])}})
    assert _upload_raw(web, two_phase.id, b"x" * 100).status_code == 200  # sending freed room
    assert _direct(web, b"e" * 1500).status_code == 413
    ck.send({"type": "attachments.delete", "params": {"attachment_id": second}})
    assert _direct(web, b"e" * 1500).status_code == 200  # deleting freed room


def test_pending_quota_counts_declared_sizes_on_s3(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    app = _disk_app(
        tmp_path,
        CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/p",
        CHATKIT_MAX_PENDING_ATTACHMENT_BYTES=3000,
    )
    ck = login_as(app, "alice")
    _create(ck, 2000)
    with pytest.raises(Exception) as refused:
        _create(ck, 2000)
    assert getattr(refused.value, "status", None) == 413


DISK_FULL_CONF = """
import resource, signal
exec(open({conf!r}).read())
_previous = globals().get("post_worker_init")

def post_worker_init(worker):
    if _previous is not None:
        _previous(worker)
    # A disk with room for {limit} bytes per file: a write past it fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.mark.integration
def test_full_disk_is_507_and_health_reports_it(tmp_path: Path) -> None:
    limit = 1024 * 1024
    conf = tmp_path / "disk_full.conf.py"
    conf.write_text(DISK_FULL_CONF.format(conf=str(ROOT / "gunicorn.conf.py"), limit=limit))
    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "files"),
        "CHATKIT_MAX_ATTACHMENT_BYTES": str(4 * limit),
    }
    with start_gunicorn(tmp_path, env=env, extra_args=["-c", str(conf)]) as server:
        alice = logged_in_session(server.url, "alice")
        assert requests.get(f"{server.url}/chatkit/health", timeout=10).status_code == 200
        small = alice.post(
            f"{server.url}/chatkit/attachments",
            files={"file": ("a.txt", b"fits", "text/plain")},
            timeout=30,
        )
        assert small.status_code == 200, small.text
        big = alice.post(
            f"{server.url}/chatkit/attachments",
            files={"file": ("b.txt", b"x" * (2 * limit), "text/plain")},
            timeout=30,
        )
        assert big.status_code == 507, big.text
        assert big.json()["error"]["code"] == "insufficient_storage"
        health = requests.get(f"{server.url}/chatkit/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["checks"]["attachments"] == "full"
        assert "attachments" in health.json()["error"]["message"]
        assert "Traceback" not in server.log()
    assert _files(tmp_path) == [small.json()["id"]]  # no partial file left


# -- #8 prune's cutoff is UTC, whatever the machine's zone ---------------------------------


def test_prune_in_tokyo_keeps_a_fresh_upload(tmp_path: Path) -> None:
    app = _disk_app(tmp_path)
    web = login_as(app, "alice").client
    fresh = _direct(web, b"seconds old").get_json()["id"]
    env = {
        **os.environ,
        "TZ": "Asia/Tokyo",
        "PYTHONPATH": str(ROOT),
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "files"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "tests.apps:gunicorn_app()",
            "chatkit",
            "prune",
            "--older-than",
            "0.25",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "0 unsent attachment(s)" in result.stdout, result.stdout
    assert fresh in _rows(app) and _files(tmp_path) == [fresh]
    # The cutoff printed is UTC, six hours back.
    expected = (datetime.now(timezone.utc) - timedelta(days=0.25)).strftime("%Y-%m-%d %H")
    assert expected in result.stdout


# -- #10 a raw body of exactly the limit ---------------------------------------------------


@pytest.mark.integration
def test_raw_upload_of_exactly_the_limit_passes(tmp_path: Path) -> None:
    app = _disk_app(tmp_path, CHATKIT_MAX_ATTACHMENT_BYTES=1000)
    ck = login_as(app, "alice")
    web = ck.client
    exact = _create(ck, 1000)
    answer = _upload_raw(web, exact.id, b"x" * 1000)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    too_big = _create(ck, 1000)
    answer = _upload_raw(web, too_big.id, b"x" * 1001)
    assert answer.status_code == 413
    assert answer.get_json()["error"]["code"] == "payload_too_large"
    # The same sizes through gunicorn (a chunked body of limit+1 too).
    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'g.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "gfiles"),
        "CHATKIT_MAX_ATTACHMENT_BYTES": "1000",
        "CHATKIT_ALLOWED_MIME_TYPES": "text/plain",
    }
    with start_gunicorn(tmp_path, env=env) as server:
        alice = logged_in_session(server.url, "alice")

        def create() -> str:
            body = {
                "type": "attachments.create",
                "params": {"name": "a.txt", "size": 1000, "mime_type": "text/plain"},
            }
            return str(alice.post(f"{server.url}/chatkit", json=body, timeout=10).json()["id"])

        url = f"{server.url}/chatkit/attachments/{{}}/upload"
        headers = {"Content-Type": "text/plain"}
        exact_answer = alice.put(
            url.format(create()), data=b"x" * 1000, headers=headers, timeout=10
        )
        assert exact_answer.status_code == 200, exact_answer.text
        chunked = alice.put(
            url.format(create()), data=iter([b"x" * 600, b"x" * 401]), headers=headers, timeout=10
        )
        assert chunked.status_code == 413, chunked.text
        assert chunked.json()["error"]["code"] == "payload_too_large"


# -- #12 S3 serves an uploaded attachment before its message is sent -----------------------


def test_s3_serves_a_presigned_upload_before_it_is_sent(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    app = _disk_app(tmp_path, CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/p")
    ck = login_as(app, "alice")
    web = ck.client
    attachment = _create(ck, 5)
    assert web.get(f"/chatkit/attachments/{attachment.id}/content").status_code == 404
    descriptor = attachment.upload_descriptor
    put = requests.put(
        str(descriptor.url), data=b"hello", headers=dict(descriptor.headers), timeout=10
    )
    assert put.status_code == 200
    answer = web.get(f"/chatkit/attachments/{attachment.id}/content")
    assert answer.status_code == 302
    assert requests.get(answer.headers["Location"], timeout=10).content == b"hello"
    # The owner only.
    assert (
        login_as(app, "bob").client.get(f"/chatkit/attachments/{attachment.id}/content")
        .status_code
        == 404
    )


# -- #11 logs name the storage, not the database -------------------------------------------


def test_s3_outage_is_logged_as_storage_unavailable(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _disk_app(tmp_path, CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/p")
    web = login_as(app, "alice").client
    with _s3_down(app, s3_server), caplog.at_level("WARNING", logger="flask_chatkit"):
        answer = _direct(web, b"nowhere to go")
    assert answer.status_code == 503
    assert answer.get_json()["error"]["code"] == "storage_unavailable"
    messages = [r.getMessage() for r in caplog.records]
    assert any("attachment storage unavailable" in m for m in messages), messages
    assert not any("database unavailable" in m for m in messages), messages


# -- the minimum upload rate -----------------------------------------------------------------


@pytest.mark.integration
def test_a_trickling_upload_gets_408_and_the_connection_closes(tmp_path: Path) -> None:
    from flask_chatkit.web.uploads import UPLOAD_GRACE_SECONDS

    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "files"),
        "CHATKIT_ALLOWED_MIME_TYPES": "text/plain",
    }
    with start_gunicorn(tmp_path, env=env) as server:
        alice = logged_in_session(server.url, "alice")
        body = {
            "type": "attachments.create",
            "params": {"name": "a.txt", "size": 1_000_000, "mime_type": "text/plain"},
        }
        attachment_id = alice.post(f"{server.url}/chatkit", json=body, timeout=10).json()["id"]
        cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies.items())
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(
            (
                f"PUT /chatkit/attachments/{attachment_id}/upload HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nCookie: {cookie}\r\nContent-Type: text/plain\r\n"
                "Content-Length: 1000000\r\n\r\n"
            ).encode()
        )
        started = time.monotonic()
        answer = b""
        sock.settimeout(1.0)
        # 100 bytes a second: far below the minimum rate. Bounded: at most 40 s.
        while time.monotonic() - started < UPLOAD_GRACE_SECONDS + 30:
            try:
                sock.sendall(b"x" * 100)
            except OSError:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            answer += data
        elapsed = time.monotonic() - started
        # Read what is left until the server closes the connection.
        sock.settimeout(5)
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer
        assert UPLOAD_GRACE_SECONDS <= elapsed < UPLOAD_GRACE_SECONDS + 10, elapsed
        # The claim was given back: a real upload now works.
        good = alice.put(
            f"{server.url}/chatkit/attachments/{attachment_id}/upload",
            data=b"x" * 1_000_000,
            headers={"Content-Type": "text/plain"},
            timeout=30,
        )
        assert good.status_code == 200, good.text
