"""Signals (blinker): what fires, with what, in which context — Flask test client."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app, has_request_context, request
from flask.testing import FlaskClient

from flask_chatkit import signals
from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app
from .helpers import login_as, sse_data
from .http_client import create_request, read_until_delta
from .memory_store import MemoryStore

ALL = (
    "request_received",
    "stream_started",
    "stream_finished",
    "stream_cancelled",
    "stream_failed",
    "attachment_stored",
)


class Recorder:
    """Connects to every signal for one app and keeps (name, kwargs, seen-context)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._receivers = []
        for name in ALL:
            receiver = self._make(name)
            self._receivers.append(receiver)  # blinker keeps weak references
            getattr(signals, name).connect(receiver, sender=app)

    def _make(self, name: str) -> Any:
        def receiver(sender: Any, **kwargs: Any) -> None:
            # Recorded, not asserted here: the extension logs and swallows a receiver's
            # exception, so a wrong sender must show up in the calls instead.
            kwargs["_sender"] = sender
            kwargs["_app"] = current_app.name
            kwargs["_path"] = request.path if has_request_context() else None
            self.calls.append((name, kwargs))

        return receiver

    def names(self) -> list[str]:
        strangers = [name for name, kwargs in self.calls if kwargs["_sender"] is not self.app]
        assert strangers == [], f"heard another app's signals: {strangers}"
        return [name for name, _ in self.calls]

    def one(self, name: str) -> dict[str, Any]:
        found = [kwargs for n, kwargs in self.calls if n == name]
        assert len(found) == 1, self.names()
        return found[0]


@pytest.fixture
def recorder(app: Flask) -> Iterator[Recorder]:
    rec = Recorder(app)
    yield rec
    for name, receiver in zip(ALL, rec._receivers, strict=True):
        getattr(signals, name).disconnect(receiver)


def test_request_received_for_a_plain_request(alice: ChatKitClient, recorder: Recorder) -> None:
    alice.list_threads()
    assert recorder.names() == ["request_received"]
    call = recorder.one("request_received")
    assert call["op"] == "threads.list"
    assert call["context"].user_id == "alice"
    assert call["_app"] == "chatkit_test_app" and call["_path"] == "/chatkit"


def test_a_finished_stream(client: FlaskClient, alice: Any, recorder: Recorder) -> None:
    response = client.post("/chatkit", json=create_request("words=4"))
    events = sse_data(response.get_data())
    thread_id = next(e["thread"]["id"] for e in events if e["type"] == "thread.created")
    assert recorder.names() == ["request_received", "stream_started", "stream_finished"]
    started = recorder.one("stream_started")
    assert started["op"] == "threads.create" and started["thread_id"] == thread_id
    assert started["context"].user_id == "alice"
    finished = recorder.one("stream_finished")
    assert finished["thread_id"] == thread_id
    assert finished["events"] == len(events)
    assert 0 < finished["duration"] < 10
    # Sent while the response is iterated: the request context is still there.
    assert finished["_path"] == "/chatkit" and finished["_app"] == "chatkit_test_app"


def test_thread_id_of_a_follow_up_comes_from_the_request(
    alice: ChatKitClient, recorder: Recorder
) -> None:
    events = alice.create_thread("words=1")
    thread_id = next(e.thread.id for e in events if e.type == "thread.created")
    recorder.calls.clear()
    alice.add_user_message(thread_id, "words=2")
    assert recorder.one("stream_started")["thread_id"] == thread_id
    assert recorder.one("stream_finished")["op"] == "threads.add_user_message"


def test_a_cancelled_stream(
    client: FlaskClient, alice: Any, recorder: Recorder, app: Flask
) -> None:
    response = client.post("/chatkit", json=create_request("words=500 delay=0.01"), buffered=False)
    read_until_delta(response)
    response.close()  # what the WSGI server does when the client is gone
    cancelled = recorder.one("stream_cancelled")
    assert "stream_finished" not in recorder.names()
    assert 1 <= cancelled["events"] < 500
    assert cancelled["context"].user_id == "alice"
    assert cancelled["thread_id"] is not None
    assert app.extensions["chatkit"].server.cancelled == 1


def test_a_failed_stream(client: FlaskClient, alice: Any, recorder: Recorder) -> None:
    response = client.post("/chatkit", json=create_request("fail=1"))
    assert response.status_code == 200  # the stream had begun: an error event ends it
    assert sse_data(response.get_data())[-1]["type"] == "error"
    failed = recorder.one("stream_failed")
    assert isinstance(failed["exc"], RuntimeError)
    assert str(failed["exc"]) == "respond failed on purpose"
    assert failed["events"] >= 1
    assert "stream_finished" not in recorder.names()


def test_an_error_before_the_stream_sends_no_stream_signal(
    client: FlaskClient, alice: Any, recorder: Recorder
) -> None:
    response = client.post(
        "/chatkit",
        json={
            "type": "threads.add_user_message",
            "params": {"thread_id": "thr_missing", "input": create_request("x")["params"]["input"]},
        },
    )
    assert response.status_code == 404
    assert recorder.names() == ["request_received"]


def test_a_failing_receiver_is_logged_and_the_stream_goes_on(
    client: FlaskClient, alice: Any, recorder: Recorder, app: Flask, caplog: Any
) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise ValueError("receiver bug")

    signals.stream_started.connect(broken, sender=app)
    signals.stream_finished.connect(broken, sender=app)
    try:
        with caplog.at_level(logging.ERROR, logger="flask_chatkit"):
            response = client.post("/chatkit", json=create_request("words=3"))
            events = sse_data(response.get_data())
    finally:
        signals.stream_started.disconnect(broken)
        signals.stream_finished.disconnect(broken)
    assert events[-1]["type"] == "thread.item.done"
    assert "stream_finished" in recorder.names()  # the other receivers still ran
    assert (
        sum("receiver bug" in r.getMessage() or r.exc_info is not None for r in caplog.records) >= 2
    )


def test_receivers_hear_only_their_own_app(
    alice: ChatKitClient, recorder: Recorder, tmp_path: Any
) -> None:
    other = create_test_app(store=MemoryStore(), instance_path=str(tmp_path / "other"))
    other_recorder = Recorder(other)
    try:
        login_as(other, "carol").create_thread("words=2")
        # The other app's own receivers heard its stream: signals were sent...
        assert other_recorder.names() == ["request_received", "stream_started", "stream_finished"]
        assert recorder.calls == []  # ...but not to the receivers of this app
        alice.create_thread("words=1")
        assert recorder.names() == ["request_received", "stream_started", "stream_finished"]
        assert len(other_recorder.names()) == 3  # and the other way round
    finally:
        for name, receiver in zip(ALL, other_recorder._receivers, strict=True):
            getattr(signals, name).disconnect(receiver)


def test_attachment_stored_on_direct_upload(
    client: FlaskClient, alice: Any, recorder: Recorder
) -> None:
    response = client.post(
        "/chatkit/attachments",
        data={"file": (io.BytesIO(b"hello"), "a.txt", "text/plain")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    stored = recorder.one("attachment_stored")
    assert stored["attachment_id"] == response.get_json()["id"]
    assert stored["size"] == 5
    assert stored["context"].user_id == "alice"


def test_attachment_stored_on_two_phase_upload(
    client: FlaskClient, alice: ChatKitClient, recorder: Recorder
) -> None:
    attachment: Any = alice.send(
        {
            "type": "attachments.create",
            "params": {"name": "n.txt", "size": 3, "mime_type": "text/plain"},
        }
    )
    assert "attachment_stored" not in recorder.names()  # nothing stored yet
    url = str(attachment.upload_descriptor.url).replace("http://localhost", "")
    response = client.post(url, data=b"abc", content_type="application/octet-stream")
    assert response.status_code == 200
    assert recorder.one("attachment_stored")["attachment_id"] == attachment.id
    assert recorder.one("attachment_stored")["size"] == 3


def test_a_reply_finishing_after_its_client_left(
    store: MemoryStore, tmp_path: Any
) -> None:
    """CHATKIT_ON_DISCONNECT="finish": the end is reported later, off the request, in the
    app context."""
    app = create_test_app(
        store=store, instance_path=str(tmp_path / "i"), CHATKIT_ON_DISCONNECT="finish"
    )
    recorder = Recorder(app)
    client = app.test_client()
    client.post("/login/alice")
    response = client.post("/chatkit", json=create_request("words=30 delay=0.01"), buffered=False)
    assert b"thread.created" in next(iter(response.response))
    response.close()
    deadline = time.monotonic() + 10
    while "stream_finished" not in recorder.names():
        assert time.monotonic() < deadline, recorder.names()
        time.sleep(0.02)
    finished = recorder.one("stream_finished")
    assert finished["_app"] == "chatkit_test_app"  # the app context was pushed for it
    assert finished["_path"] is None  # the request itself is over
    assert 1 <= finished["events"] < 30  # the events the client got before it left
    assert "stream_cancelled" not in recorder.names()
    assert app.extensions["chatkit"].server.cancelled == 0
