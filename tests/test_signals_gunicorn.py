"""Signals under real gunicorn workers: cancelled replies counted per user by a receiver."""

from __future__ import annotations

import collections
import json
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
import requests

from .gunicorn import start_gunicorn
from .http_client import (
    cookie_header,
    create_request,
    logged_in_session,
    raw_stream_request,
    read_until,
)

WORKER_ARGS = {"gevent": [], "gthread": ["--threads", "4"], "sync": []}


def abort_mid_stream(base_url: str, cookie: str) -> None:
    """Start a long reply, read its first delta, then reset the connection."""
    sock = raw_stream_request(base_url, cookie, create_request("words=400 delay=0.01"))
    try:
        read_until(sock, b"text_delta")
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def read_log(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_class", ["gevent", "gthread", "sync"])
def test_cancelled_replies_counted_per_user(tmp_path: Path, worker_class: str) -> None:
    log_path = tmp_path / "signals.jsonl"
    env = {"CHATKIT_TEST_SIGNAL_LOG": str(log_path), "CHATKIT_HEARTBEAT_SECONDS": "1"}
    with start_gunicorn(
        tmp_path,
        "tests.signal_app:gunicorn_app()",
        env=env,
        worker_class=worker_class,
        extra_args=WORKER_ARGS[worker_class],
    ) as server:
        health = requests.get(f"{server.url}/chatkit/health", timeout=10)
        assert health.status_code == 200 and health.json()["checks"]["event_loop"] == "ok"
        alice = logged_in_session(server.url, "alice")
        bob = logged_in_session(server.url, "bob")
        abort_mid_stream(server.url, cookie_header(alice))
        abort_mid_stream(server.url, cookie_header(alice))
        abort_mid_stream(server.url, cookie_header(bob))
        finished = bob.post(f"{server.url}/chatkit", json=create_request("words=3"), timeout=30)
        assert finished.status_code == 200 and b"thread.item.done" in finished.content
        alice.close()  # no idle keep-alive connection to delay the worker's exit
        bob.close()

        deadline = time.monotonic() + 20
        while sum(e["signal"] == "stream_cancelled" for e in read_log(log_path)) < 3:
            assert time.monotonic() < deadline, (read_log(log_path), server.log()[-2000:])
            time.sleep(0.1)
        time.sleep(0.3)  # nothing more should arrive
        entries = read_log(log_path)
        cancelled = collections.Counter(
            e["user"] for e in entries if e["signal"] == "stream_cancelled"
        )
        assert cancelled == {"alice": 2, "bob": 1}
        done = [e for e in entries if e["signal"] == "stream_finished"]
        assert [e["user"] for e in done] == ["bob"]
        assert all(e["app"] == "chatkit_test_app" for e in entries)
        assert all(0 < int(e["events"]) < 400 for e in entries)  # type: ignore[call-overload]
        assert "Traceback" not in server.log()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_trace_per_chat_turn_under_gevent(tmp_path: Path) -> None:
    spans_path = tmp_path / "spans.jsonl"
    with start_gunicorn(
        tmp_path, "tests.signal_app:otel_app()", env={"CHATKIT_TEST_SPANS": str(spans_path)}
    ) as server:
        alice = logged_in_session(server.url, "alice")
        reply = alice.post(f"{server.url}/chatkit", json=create_request("words=3"), timeout=30)
        assert reply.status_code == 200 and b"thread.item.done" in reply.content
        alice.close()
        deadline = time.monotonic() + 10
        while not any(s["name"] == "POST /chatkit" for s in read_log(spans_path)):
            assert time.monotonic() < deadline, read_log(spans_path)
            time.sleep(0.1)
    spans = {str(s["name"]): s for s in read_log(spans_path)}
    server_span, chatkit, user = (
        spans["POST /chatkit"],
        spans["chatkit threads.create"],
        spans["user-work"],
    )
    assert chatkit["parent"] == server_span["id"]
    assert user["parent"] == chatkit["id"]  # the app's own span, created inside respond
    assert user["trace"] == chatkit["trace"] == server_span["trace"]
    attributes = chatkit["attributes"]
    assert isinstance(attributes, dict) and attributes["chatkit.outcome"] == "finished"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_reply_cancelled_by_a_stopping_worker(tmp_path: Path) -> None:
    """SIGTERM to the master: the worker cancels the open reply (bridge/lifecycle.py) while
    the client is still reading; the receiver hears stream_cancelled."""
    log_path = tmp_path / "signals.jsonl"
    env = {"CHATKIT_TEST_SIGNAL_LOG": str(log_path), "CHATKIT_CANCEL_TIMEOUT": "1"}
    with start_gunicorn(tmp_path, "tests.signal_app:gunicorn_app()", env=env) as server:
        alice = logged_in_session(server.url, "alice")
        sock = raw_stream_request(
            server.url, cookie_header(alice), create_request("words=2000 delay=0.01")
        )
        alice.close()
        try:
            read_until(sock, b"text_delta")
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while not read_log(log_path):
                assert time.monotonic() < deadline, server.log()[-2000:]
                time.sleep(0.1)
        finally:
            sock.close()
    (entry,) = read_log(log_path)
    assert entry["signal"] == "stream_cancelled" and entry["user"] == "alice"
    assert 0 < int(entry["events"]) < 2000  # type: ignore[call-overload]
