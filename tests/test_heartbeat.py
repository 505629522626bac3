"""``CHATKIT_HEARTBEAT_SECONDS``: pings during a reply's silences; ``0`` turns them off.

A reply's silences here last well under a second, so the absence of pings alone
cannot tell "off" from the 15 s default. The tests also record how long each
stream read was allowed to wait for the next chunk (the wait whose timeout is a
ping): with heartbeats off, every wait is unbounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flask_chatkit.bridge import stream as bridge_stream

from .apps import create_test_app
from .helpers import login_as, sse_data
from .http_client import create_request
from .memory_store import MemoryStore

PING = b": ping\n\n"
# Three words 0.4 s apart: 1.2 s of silences, each many times the control's interval.
SLOW_REPLY = "words=3 delay=0.4"


class RecordingChannel:
    """A stream's channel that notes the timeout of each wait for chunks."""

    def __init__(self, channel: Any, waits: list[float | None]) -> None:
        self._channel = channel
        self._waits = waits

    def get_batch(self, timeout: float | None) -> Any:
        self._waits.append(timeout)
        return self._channel.get_batch(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, heartbeat: float
) -> tuple[bytes, list[float | None]]:
    """The body of a slow reply and the timeouts its reader waited with."""
    waits: list[float | None] = []
    new_channel = bridge_stream.new_channel
    monkeypatch.setattr(
        bridge_stream, "new_channel", lambda: RecordingChannel(new_channel(), waits)
    )
    app = create_test_app(
        store=MemoryStore(), instance_path=str(tmp_path / f"i{heartbeat}"),
        CHATKIT_HEARTBEAT_SECONDS=heartbeat,
    )
    alice = login_as(app, "alice")
    response = alice.client.post("/chatkit", json=create_request(SLOW_REPLY))
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    return response.get_data(), waits


def test_heartbeat_zero_sends_no_pings_and_the_reply_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, waits = reply(tmp_path, monkeypatch, 0)
    assert PING not in body
    # Off, not merely long (the 15 s default) or short: no wait ever times out.
    assert waits and set(waits) == {None}, waits
    events = sse_data(body)
    deltas = [e["update"]["delta"] for e in events if e["type"] == "thread.item.updated"]
    assert deltas == ["w0 ", "w1 ", "w2 "]
    assert events[-1]["type"] == "thread.item.done"


def test_control_a_short_heartbeat_pings_in_the_same_silences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shows the checks above can see a ping, and a wait armed with the interval.
    body, waits = reply(tmp_path, monkeypatch, 0.05)
    assert body.count(PING) >= 3
    assert waits and set(waits) == {0.05}, waits
