"""Attachment rows over their life: one upload wins, links stay, URLs derive, orphans go.

* Issue 11 item 5: two uploads to one two-phase id — the first wins, the second
  is a 409 at once (a conditional UPDATE claims the row), and a saved link to a
  thread is never cleared. Real ``gunicorn -k gevent`` for the race.
* Issue 11 item 8: URLs are built from a trusted base and rows keep relative ones.
* Issue 10 §4: ``prune`` reclaims attachments never sent (rows and bytes, disk
  and S3), ``--dry-run`` changes nothing, and interrupted disk uploads leave no
  ``.part`` file once a worker restarts.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from chatkit.types import FileAttachment
from flask import Flask

from flask_chatkit.cli import chatkit_cli
from flask_chatkit.storage.disk import DiskStorage
from flask_chatkit.storage.sql import SQLAlchemyStore
from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app
from .gunicorn import start_gunicorn
from .http_client import cookie_header, logged_in_session, recv_until, user_input
from .s3 import S3Server

ALICE = SimpleNamespace(user_id="alice")


def create_attachment(session: Any, base: str, size: int, mime: str = "text/plain") -> Any:
    params = {"name": "notes.txt", "size": size, "mime_type": mime}
    response = session.post(
        f"{base}/chatkit", json={"type": "attachments.create", "params": params}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


# -- item 5: the upload race ---------------------------------------------------


@pytest.mark.integration
def test_first_upload_wins_and_the_second_is_409(tmp_path: Path) -> None:
    files = tmp_path / "files"
    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(files),
    }
    size = 300_000
    with start_gunicorn(tmp_path, env=env) as server:
        alice = logged_in_session(server.url, "alice")
        attachment = create_attachment(alice, server.url, size)
        path = f"/chatkit/attachments/{attachment['id']}/upload"

        engine = sa.create_engine(env["CHATKIT_DATABASE_URL"])

        def upload_state() -> str | None:
            with engine.connect() as conn:
                return conn.execute(
                    sa.text("SELECT upload_state FROM chatkit_attachments WHERE id = :id"),
                    {"id": attachment["id"]},
                ).scalar()

        slow = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        try:
            slow.sendall(
                (
                    f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {size}\r\nCookie: {cookie_header(alice)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                + b"S" * 1000
            )
            # Ordered by the event, not a clock: the slow upload holds the claim
            # (a claim is stored as "c:<unix seconds>", see storage/sql.py).
            deadline = time.monotonic() + 20
            while not str(upload_state()).startswith("c:"):
                assert time.monotonic() < deadline, upload_state()
                time.sleep(0.02)
            fast = alice.put(f"{server.url}{path}", data=b"F" * size, timeout=10)
            assert fast.status_code == 409, fast.text
            assert fast.json()["error"]["code"] == "conflict"

            slow.sendall(b"S" * (size - 1000))
            answer = recv_until(slow, lambda seen: b"\r\n\r\n" in seen)
        finally:
            slow.close()
        engine.dispose()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]

        content = alice.get(f"{server.url}/chatkit/attachments/{attachment['id']}/content")
        assert content.content == b"S" * size
        # Sent in a message, then a late upload attempt: 409, link and bytes kept.
        message = {
            "type": "threads.create",
            "params": {"input": user_input("see file", [attachment["id"]])},
        }
        assert alice.post(f"{server.url}/chatkit", json=message, timeout=30).status_code == 200
        again = alice.put(f"{server.url}{path}", data=b"F" * size, timeout=10)
        assert again.status_code == 409
        assert sorted(os.listdir(files)) == [attachment["id"]]
        engine = sa.create_engine(env["CHATKIT_DATABASE_URL"])
        with engine.connect() as conn:
            thread_id = conn.execute(sa.text("SELECT thread_id FROM chatkit_attachments")).scalar()
        engine.dispose()
        assert thread_id is not None and thread_id.startswith("thr_")


def test_saving_an_unlinked_copy_never_clears_the_thread_id(store_url: str) -> None:
    store = SQLAlchemyStore(store_url)
    store.create_all()
    try:
        attachment = FileAttachment(id="atc_1", name="a.txt", mime_type="text/plain")
        run = store_run(store)
        run(store.save_attachment(attachment.model_copy(update={"thread_id": "thr_1"}), ALICE))
        run(store.save_attachment(attachment, ALICE))  # a stale copy (thread_id None)
        loaded = run(store.load_attachment("atc_1", ALICE))
        assert loaded.thread_id == "thr_1"
        with store.engine.connect() as conn:
            column = conn.execute(sa.select(store.attachments.c.thread_id)).scalar()
        assert column == "thr_1"
    finally:
        store.close()
        store.engine.dispose()


def store_run(store: SQLAlchemyStore) -> Any:
    import asyncio

    return asyncio.run


# -- item 8: URLs from a trusted base, stored relative ---------------------------


def _app(tmp_path: Path, public_url: str | None) -> Flask:
    config: dict[str, Any] = {
        "instance_path": str(tmp_path / "instance"),
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "files"),
    }
    if public_url:
        config["CHATKIT_PUBLIC_URL"] = public_url
    return create_test_app(**config)


def test_urls_come_from_the_public_url_and_are_not_stored_absolute(tmp_path: Path) -> None:
    app = _app(tmp_path, "https://chat.example.com/app")
    web = app.test_client()
    web.post("/login/alice", headers={"Host": "evil.example"})
    body = json.dumps(
        {
            "type": "attachments.create",
            "params": {"name": "p.png", "size": 4, "mime_type": "image/png"},
        }
    )
    response = web.post(
        "/chatkit",
        data=body,
        content_type="application/json",
        headers={"Host": "evil.example"},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    created = response.get_json()
    base = "https://chat.example.com/app/chatkit/attachments/" + created["id"]
    assert created["upload_descriptor"]["url"] == f"{base}/upload"
    assert created["preview_url"] == f"{base}/content"

    uploaded = web.put(
        f"/chatkit/attachments/{created['id']}/upload",
        data=b"\x89PNG",
        headers={"Host": "evil.example"},
    )
    assert uploaded.status_code == 200
    assert uploaded.get_json()["preview_url"] == f"{base}/content"
    web.post("/login/alice")
    events = ChatKitClient(web).send(
        {"type": "threads.create", "params": {"input": user_input("pic", [created["id"]])}}
    )
    streamed = [
        str(a.preview_url)
        for e in events
        if e.type == "thread.item.done"
        for a in getattr(e.item, "attachments", [])
    ]
    assert streamed == [f"{base}/content"]  # the SSE stream is rewritten too

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with engine.connect() as conn:
        stored = [
            json.dumps(row[0])
            for table in ("chatkit_attachments", "chatkit_items")
            for row in conn.execute(sa.text(f"SELECT payload FROM {table}"))
        ]
    engine.dispose()
    assert any(created["id"] in payload for payload in stored)
    for payload in stored:
        assert "evil.example" not in payload and "chat.example.com" not in payload
        assert "http://" not in payload and "https://" not in payload

    # The same rows served by an app on a new domain: URLs on the new domain.
    moved = _app(tmp_path, "https://new.example.org")
    moved_web = moved.test_client()
    moved_web.post("/login/alice")
    threads = ChatKitClient(moved_web).list_threads().data
    items = ChatKitClient(moved_web).list_items(threads[0].id).data
    previews = [str(a.preview_url) for item in items for a in getattr(item, "attachments", [])]
    assert previews == [f"https://new.example.org/chatkit/attachments/{created['id']}/content"]


def test_without_a_public_url_urls_come_from_server_name(tmp_path: Path) -> None:
    # CHATKIT_PUBLIC_URL unset: the documented fallback is SERVER_NAME (with
    # PREFERRED_URL_SCHEME and APPLICATION_ROOT), not the Host the request named.
    app = _app(tmp_path, None)
    app.config.update(
        SERVER_NAME="chat.example.com:8443", PREFERRED_URL_SCHEME="https",
        APPLICATION_ROOT="/app", SESSION_COOKIE_PATH="/",
    )
    # The request's own root (another host, http, no /app) differs from that base.
    web = app.test_client()
    assert web.post("/login/alice", base_url="http://evil.example/").status_code == 200
    response = web.post(
        "/chatkit",
        json={
            "type": "attachments.create",
            "params": {"name": "p.png", "size": 4, "mime_type": "image/png"},
        },
        base_url="http://evil.example/",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    created = response.get_json()
    base = "https://chat.example.com:8443/app/chatkit/attachments/" + created["id"]
    assert created["upload_descriptor"]["url"] == f"{base}/upload"
    assert created["preview_url"] == f"{base}/content"


# -- §4: prune reclaims unsent attachments; no .part files after a restart ------


@pytest.fixture(params=["disk", "s3"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_prune_removes_unsent_attachments_rows_and_bytes(
    tmp_path: Path, storage_kind: str, request: pytest.FixtureRequest
) -> None:
    config: dict[str, Any] = {
        "instance_path": str(tmp_path / "instance"),
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(tmp_path / "files"),
    }
    server: S3Server | None = None
    bucket = ""
    if storage_kind == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        config["CHATKIT_ATTACHMENTS_URL"] = f"s3://{bucket}/p"
    app = create_test_app(**config)
    web = app.test_client()
    web.post("/login/alice")
    ck = ChatKitClient(web)

    def direct(name: str) -> str:
        response = web.post(
            "/chatkit/attachments",
            data={"file": (io.BytesIO(b"bytes of " + name.encode()), name, "text/plain")},
            content_type="multipart/form-data",
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        return str(response.get_json()["id"])

    never_uploaded = ck.send(
        {
            "type": "attachments.create",
            "params": {"name": "x.txt", "size": 3, "mime_type": "text/plain"},
        }
    ).id
    uploaded_unsent = direct("unsent.txt")
    sent = direct("sent.txt")
    ck.send({"type": "threads.create", "params": {"input": user_input("hi", [sent])}})
    fresh_unsent = direct("fresh.txt")

    def blobs() -> list[str]:
        if server is not None:
            return [key.rsplit("/", 1)[1] for key in server.keys(bucket)]
        return sorted(os.listdir(tmp_path / "files"))

    assert sorted(blobs()) == sorted([uploaded_unsent, sent, fresh_unsent])
    store = app.extensions["chatkit"].store
    old = datetime.now() - timedelta(days=10)
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(store.attachments)
            .where(store.attachments.c.id != fresh_unsent)
            .values(created_at=old)
        )
    runner = app.test_cli_runner()
    dry = runner.invoke(chatkit_cli, ["prune", "--older-than", "7", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert never_uploaded in dry.output and uploaded_unsent in dry.output
    assert sent not in dry.output and fresh_unsent not in dry.output
    assert "Would remove 0 thread(s)" in dry.output and "2 unsent attachment(s)" in dry.output
    assert sorted(blobs()) == sorted([uploaded_unsent, sent, fresh_unsent])

    result = runner.invoke(chatkit_cli, ["prune", "--older-than", "7"])
    assert result.exit_code == 0, result.output
    assert "Removed 0 thread(s)" in result.output and "2 unsent attachment(s)" in result.output
    assert sorted(blobs()) == sorted([sent, fresh_unsent])
    with store.engine.connect() as conn:
        ids = set(conn.execute(sa.select(store.attachments.c.id)).scalars())
    assert ids == {sent, fresh_unsent}


@pytest.mark.integration
def test_interrupted_upload_leaves_no_part_file_after_restart(tmp_path: Path) -> None:
    files = tmp_path / "files"
    env = {"CHATKIT_ATTACHMENTS_DIR": str(files)}
    with start_gunicorn(tmp_path, env=env) as server:
        alice = logged_in_session(server.url, "alice")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        boundary = "b0undary"
        head = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            'filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n'
        ).encode()
        sock.sendall(
            (
                f"POST /chatkit/attachments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: 5000000\r\nCookie: {cookie_header(alice)}\r\n\r\n"
            ).encode()
            + head
            + b"x" * 2_000_000
        )

        def parts() -> list[str]:
            names = os.listdir(files) if files.exists() else []
            return [name for name in names if name.endswith(".part")]

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not parts():
            time.sleep(0.05)
        assert parts()
        for pid in server.worker_pids():
            os.kill(pid, 9)  # the worker dies mid-upload: its .part stays behind
        sock.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # gunicorn's master starts a new worker, which sweeps the directory
            try:
                if requests.post(f"{server.url}/login/bob", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        assert parts() == []


def test_sweep_keeps_uploads_of_live_processes(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = files / f".upload-{child.pid}-abc.part"
        dead_pid = _dead_pid()
        dead = files / f".upload-{dead_pid}-def.part"
        live.write_bytes(b"1")
        dead.write_bytes(b"2")
        (files / "atc_keep").write_bytes(b"3")
        DiskStorage(files)
        assert sorted(os.listdir(files)) == sorted(["atc_keep", live.name])
    finally:
        child.kill()
        child.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid

