"""Shared helpers for the reliability suite: real gunicorn, raw sockets, /proc.

Everything talks to 127.0.0.1 only; every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from tests.http_client import create_request, logged_in_session
from tests.http_client import user_input as user_input  # re-exported for the tests here
from tests.pg import fresh_database

APP_SPEC = "tests.reliability.app:gunicorn_app()"
PREFIX = "/chatkit"
DELTA = "assistant_message.content_part.text_delta"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def shared_pg_url(pg_cluster: Any) -> Iterator[str]:
    """One empty PostgreSQL database for this test, shared by all its servers."""
    with fresh_database(pg_cluster) as url:
        yield url


# -- requests-level helpers ---------------------------------------------------


# The request builders and login are the integration tests' own (tests.http_client).
login = logged_in_session
create_payload = create_request


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body (heartbeat comments and a torn tail skipped)."""
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                # ValueError: a block cut short by a dropped connection
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line[5:].strip()))
    return events


def thread_id_of(events: list[dict[str, Any]]) -> str | None:
    for event in events:
        if event.get("type") == "thread.created":
            return str(event["thread"]["id"])
    return None


def delta_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["update"]["delta"] for e in events
        if e.get("type") == "thread.item.updated" and e.get("update", {}).get("type") == DELTA
    )


def post(session: requests.Session, base_url: str, payload: dict[str, Any],
         timeout: float = 30) -> requests.Response:
    return session.post(f"{base_url}{PREFIX}", json=payload, timeout=timeout)


def create_thread(session: requests.Session, base_url: str, text: str,
                  timeout: float = 30) -> tuple[str, list[dict[str, Any]]]:
    response = post(session, base_url, create_payload(text), timeout)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response.content)
    thread_id = thread_id_of(events)
    assert thread_id, events
    assert not [e for e in events if e.get("type") == "error"], events
    return thread_id, events


def list_items(session: requests.Session, base_url: str, thread_id: str,
               timeout: float = 30) -> list[dict[str, Any]]:
    response = post(session, base_url, {"type": "items.list", "params": {
        "thread_id": thread_id, "order": "asc", "limit": 100}}, timeout)
    assert response.status_code == 200, response.text[:500]
    page = response.json()
    assert not page["has_more"]
    return list(page["data"])


def list_threads(session: requests.Session, base_url: str,
                 timeout: float = 30) -> list[dict[str, Any]]:
    """All of the session user's threads (follows pagination, bounded)."""
    threads: list[dict[str, Any]] = []
    after = None
    for _ in range(100):
        params: dict[str, Any] = {"order": "asc", "limit": 100}
        if after:
            params["after"] = after
        response = post(session, base_url, {"type": "threads.list", "params": params}, timeout)
        assert response.status_code == 200, response.text[:500]
        page = response.json()
        threads += page["data"]
        if not page["has_more"]:
            return threads
        after = page["after"]
    raise AssertionError("threads.list never ended")


def item_text(item: dict[str, Any]) -> str:
    return "".join(c.get("text", "") for c in item.get("content", []) if isinstance(c, dict))


def observations(base_url: str) -> dict[str, Any]:
    response = requests.get(f"{base_url}/_test/observations", timeout=10)
    assert response.status_code == 200
    return dict(response.json())


def loop_tasks(base_url: str) -> int:
    response = requests.get(f"{base_url}/_test/loop", timeout=15)
    assert response.status_code == 200, response.text[:500]
    return int(response.json()["tasks"])


# -- /proc ---------------------------------------------------------------------


def native_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# -- raw-socket streaming client ---------------------------------------------------


def raw_request(port: int, cookie: str, payload: dict[str, Any], *,
                rcvbuf: int | None = None, timeout: float = 30) -> socket.socket:
    """Open a connection and send one HTTP/1.0 POST (the body then runs until close)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # must be set before connect to shrink the TCP window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(payload).encode()
    head = (
        f"POST {PREFIX} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Cookie: {cookie}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def abort(sock: socket.socket, reset: bool = True) -> None:
    """Drop the connection abruptly: RST (SO_LINGER 0) or a bare close. Idempotent:
    cleanup paths may call it on a socket already dropped."""
    if sock.fileno() == -1:
        return
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


@dataclass
class StreamReader:
    """Reads an SSE response off a raw socket, event by event."""

    sock: socket.socket
    status: int | None = None
    buffer: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False

    def _fill(self, size: int = 65536) -> bool:
        chunk = self.sock.recv(size)
        if not chunk:
            self.ended = True
            return False
        self.buffer += chunk
        return True

    def read_headers(self) -> int:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"connection closed in headers: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])
        return self.status

    def next_event(self) -> dict[str, Any] | None:
        """The next data event, or None at the end of the body."""
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                for event in sse_events(block + b"\n\n"):
                    self.events.append(event)
                    return event
            if self.ended or not self._fill():
                return None

    def deltas(self) -> str:
        return delta_text(self.events)

    def thread_id(self) -> str | None:
        return thread_id_of(self.events)


def store_items(base_url: str, user_id: str, thread_id: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base_url}/_test/store/{user_id}/{thread_id}", timeout=15)
    assert response.status_code == 200, response.text[:500]
    return list(response.json()["items"])
