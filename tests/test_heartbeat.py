"""``CHATKIT_HEARTBEAT_SECONDS``: pings during a reply's silences; ``0`` turns them off."""

from __future__ import annotations

from pathlib import Path

from .apps import create_test_app
from .helpers import login_as, sse_data
from .http_client import create_request
from .memory_store import MemoryStore

PING = b": ping\n\n"
# Three words 0.4 s apart: 1.2 s of silences, each many times the control's interval.
SLOW_REPLY = "words=3 delay=0.4"


def reply_body(tmp_path: Path, heartbeat: float) -> bytes:
    app = create_test_app(
        store=MemoryStore(), instance_path=str(tmp_path / f"i{heartbeat}"),
        CHATKIT_HEARTBEAT_SECONDS=heartbeat,
    )
    alice = login_as(app, "alice")
    response = alice.client.post("/chatkit", json=create_request(SLOW_REPLY))
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    return response.get_data()


def test_heartbeat_zero_sends_no_pings_and_the_reply_streams(tmp_path: Path) -> None:
    body = reply_body(tmp_path, 0)
    assert PING not in body
    events = sse_data(body)
    deltas = [e["update"]["delta"] for e in events if e["type"] == "thread.item.updated"]
    assert deltas == ["w0 ", "w1 ", "w2 "]
    assert events[-1]["type"] == "thread.item.done"


def test_control_a_short_heartbeat_pings_in_the_same_silences(tmp_path: Path) -> None:
    # Shows the check above can see a ping: the same reply with a 0.05 s interval.
    assert reply_body(tmp_path, 0.05).count(PING) >= 3
