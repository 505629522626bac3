"""Tiny HTTP helpers for integration tests against a real server."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import requests


def user_input(text: str, attachments: list[str] | None = None) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": attachments or [],
        "inference_options": {},
    }


def create_request(text: str) -> dict[str, Any]:
    return {"type": "threads.create", "params": {"input": user_input(text)}}


def add_message_request(thread_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "threads.add_user_message",
        "params": {"thread_id": thread_id, "input": user_input(text)},
    }


def logged_in_session(base_url: str, user: str) -> requests.Session:
    session = requests.Session()
    assert session.post(f"{base_url}/login/{user}", timeout=10).status_code == 200
    return session


def sse_events(response: requests.Response) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, event) for each ``data:`` line of a streaming response."""
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            events.append((time.monotonic(), json.loads(line[6:])))
    return events


def raw_stream_request(base_url: str, cookie: str, payload: dict[str, Any]) -> socket.socket:
    """Open a raw socket and send a ChatKit POST; the caller reads and closes it."""
    parsed = urlparse(base_url)
    body = json.dumps(payload).encode()
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    head = (
        f"POST /chatkit HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 15) -> bytes:
    """Read a raw socket until ``marker`` arrives; everything read so far."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, seen[-300:]
        chunk = sock.recv(65536)
        assert chunk, seen[-300:]
        seen += chunk
    return seen


def cookie_header(session: requests.Session) -> str:
    return "; ".join(f"{c.name}={c.value}" for c in session.cookies)


def read_until_delta(response: Any, limit: int = 1000) -> bytes:
    """Read a test-client streaming response until respond's first text delta arrived."""
    seen = b""
    for chunk in response.response:
        seen += chunk
        if b"text_delta" in seen:
            return seen
        limit -= 1
        assert limit > 0, seen[-300:]
    raise AssertionError(f"the stream ended before any delta: {seen[-300:]!r}")


def recv_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 20) -> bytes:
    """Read until ``done(received)``; fails at EOF or after ``timeout`` s (never loops on)."""
    received = b""
    deadline = time.monotonic() + timeout
    while not done(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not seen within {timeout}s: {received[-300:]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection: {received[-300:]!r}")
        received += chunk
    return received


def reset(sock: socket.socket) -> None:
    """Drop the connection abruptly (RST, SO_LINGER 0), like a browser tab going away;
    closes the socket whatever happens; a socket already closed is left alone."""
    if sock.fileno() == -1:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        sock.close()
