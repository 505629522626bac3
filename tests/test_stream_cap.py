"""``CHATKIT_MAX_STREAMS_PER_USER`` caps one user's open streams in a worker (issue 17, #13).

Before: one user held 300 streams that never read; another user's list then took 3 s.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from .apps import create_test_app
from .helpers import login_as
from .http_client import create_request, read_until_delta
from .memory_store import MemoryStore

CAP = 2
SLOW = "words=400 delay=0.01"  # ~4 s: open for the whole test unless closed


@pytest.fixture
def capped_app(tmp_path: Path) -> Flask:
    return create_test_app(
        store=MemoryStore(),
        instance_path=str(tmp_path / "instance"),
        CHATKIT_MAX_STREAMS_PER_USER=CAP,
    )


class HeldStream:
    """A stream opened, read up to its first delta and held open in a thread of its own.

    Each request needs its own context: the test client serves requests in the
    caller's thread, where a held-open stream's Flask contexts (and ``g``, with
    Flask-Login's cached user) would leak into the next request.
    """

    def __init__(self, client: FlaskClient, text: str = SLOW) -> None:
        self.status = 0
        self.body = b""
        self._opened = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, text), daemon=True)
        self._thread.start()
        assert self._opened.wait(30), "the stream did not start"

    def _run(self, client: FlaskClient, text: str) -> None:
        response = client.post("/chatkit", json=create_request(text), buffered=False)
        try:
            self.status = response.status_code
            if self.status == 200:
                self.body = read_until_delta(response)  # running: respond has sent text
            else:
                self.body = response.get_data()
        finally:
            self._opened.set()
            self._release.wait(30)
            response.close()  # a disconnect: the stream is cancelled

    def close(self) -> None:
        self._release.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def open_stream(client: FlaskClient) -> HeldStream:
    held = HeldStream(client)
    assert held.status == 200, held.body
    return held


def assert_every_slot_free(client: FlaskClient) -> None:
    """The user can hold ``CAP`` streams at once again (each closed afterwards)."""
    held: list[HeldStream] = []
    try:
        for _ in range(CAP):
            held.append(open_stream(client))
    finally:
        for stream in reversed(held):
            stream.close()


def test_the_stream_past_the_cap_is_429_and_a_closed_one_frees_its_slot(
    capped_app: Flask,
) -> None:
    alice = login_as(capped_app, "alice").client
    bob = login_as(capped_app, "bob").client
    first = open_stream(alice)
    second = open_stream(alice)
    try:
        refused = alice.post("/chatkit", json=create_request(SLOW))
        assert refused.status_code == 429
        assert refused.get_json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.mimetype == "application/json"  # before anything streamed
        # Non-streaming requests are not counted.
        listed = alice.post("/chatkit", json={"type": "threads.list", "params": {}})
        assert listed.status_code == 200, listed.get_data()
        # Another user is not affected by alice's streams.
        open_stream(bob).close()

        second.close()  # a cancelled stream frees its slot
        second = open_stream(alice)
        assert alice.post("/chatkit", json=create_request(SLOW)).status_code == 429
    finally:
        second.close()
        first.close()
    # Every slot is free again; finished streams free theirs too.
    for _ in range(CAP + 1):
        finished = alice.post("/chatkit", json=create_request("words=2"))
        assert finished.status_code == 200
        assert b"thread.item.done" in finished.get_data()
    assert_every_slot_free(alice)


def test_streams_that_fail_before_any_byte_free_their_slot(capped_app: Flask) -> None:
    alice = login_as(capped_app, "alice").client
    for _ in range(CAP + 2):  # a 404 before the stream starts must not keep a slot
        response = alice.post(
            "/chatkit",
            json={
                "type": "threads.add_user_message",
                "params": {
                    "thread_id": "thr_missing",
                    "input": create_request("x")["params"]["input"],
                },
            },
        )
        assert response.status_code == 404
    for _ in range(CAP + 2):  # respond fails: an error event, then the slot is free
        failed = alice.post("/chatkit", json=create_request("fail=1"))
        assert failed.status_code == 200
        assert b'"error"' in failed.get_data()
    assert_every_slot_free(alice)
