"""Shared helpers for the reliability suite: real gunicorn, raw sockets, /proc.

Everything talks to 127.0.0.1 only; every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gunicorn import RunningServer, start_gunicorn
from tests.helpers import sse_data, thread_id_of
from tests.http_client import add_message_request, create_request, logged_in_session
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


def serve(
    tmp_path: Path, *, database_url: str | None = None, env: dict[str, str] | None = None,
    **options: Any,
) -> AbstractContextManager[RunningServer]:
    """The reliability app under a real gunicorn (``start_gunicorn`` ``options``): on
    the default SQLAlchemyStore at ``database_url`` when one is given, else on the
    in-memory test store; ``env`` adds settings."""
    settings = dict(env or {})
    if database_url is not None:
        settings.update(CHATKIT_TEST_STORE="sql", CHATKIT_DATABASE_URL=database_url)
    return start_gunicorn(tmp_path, APP_SPEC, env=settings, **options)


# -- requests-level helpers ---------------------------------------------------


# The request builders, login and SSE parsing are shared with the other tests
# (tests.http_client, tests.helpers).
login = logged_in_session
create_payload = create_request
add_message_payload = add_message_request
sse_events = sse_data


def cookie_of(session: requests.Session) -> str:
    """The ``Cookie`` header of a logged-in session, for raw-socket requests."""
    return "session=" + session.cookies["session"]


def delta_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["update"]["delta"] for e in events
        if e.get("type") == "thread.item.updated" and e.get("update", {}).get("type") == DELTA
    )


def post(session: requests.Session, base_url: str, payload: dict[str, Any],
         timeout: float = 30) -> requests.Response:
    return session.post(f"{base_url}{PREFIX}", json=payload, timeout=timeout)


def stream(session: requests.Session, base_url: str, payload: dict[str, Any],
           timeout: float = 30) -> list[dict[str, Any]]:
    """The events of a streaming request that must succeed: 200, SSE, no error event."""
    response = post(session, base_url, payload, timeout)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_data(response.content)
    assert not [e for e in events if e.get("type") == "error"], events
    return events


def create_thread(session: requests.Session, base_url: str, text: str,
                  timeout: float = 30) -> tuple[str, list[dict[str, Any]]]:
    events = stream(session, base_url, create_payload(text), timeout)
    thread_id = thread_id_of(events)
    assert thread_id, events
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


def proc_status(pid: int, key: str) -> int:
    """A number of ``/proc/<pid>/status`` (``Threads``, ``VmRSS`` in kB, ...)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {key}: line")


def native_threads(pid: int) -> int:
    return proc_status(pid, "Threads")


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
