"""Slow request bodies and stream hogs under a real ``gunicorn -k gevent`` (issue 17, #2 and #13).

Before: 55 signed-in sockets sending 1 byte every 5 s held all 50
``worker_connections`` for 20 s+, and ``GET /chatkit/health`` timed out until they
closed; one user could hold hundreds of streams.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from pathlib import Path

import pytest
import requests

from .gunicorn import start_gunicorn
from .http_client import cookie_header, create_request, logged_in_session

pytestmark = pytest.mark.integration

BODY_TIMEOUT = 2.0
SLOW_SOCKETS = 55
CONNECTIONS = 50  # fewer than the slow sockets: without a timeout they starve the worker
BYTE_EVERY = 0.5
TRICKLE_FOR = 15.0  # bounded: each slow socket gives up after this long


def slow_post(port: int, cookie: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /chatkit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Cookie: {cookie}\r\n\r\n"
    ).encode()
    sock.sendall(head)
    return sock


def trickle(sock: socket.socket, body: bytes) -> tuple[bytes, bool, float]:
    """Send ``body`` a byte at a time until the server answers; returns (response,
    closed by the server, seconds until the answer)."""
    started = time.monotonic()
    sock.setblocking(False)
    received = b""
    closed = False
    sent = 0
    deadline = started + TRICKLE_FOR
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            received += chunk
            continue
        except BlockingIOError:
            pass
        if sent < len(body):
            try:
                sock.send(body[sent : sent + 1])
                sent += 1
            except OSError:  # reset after the server closed it
                closed = True
                break
        time.sleep(BYTE_EVERY if not received else 0.05)
    elapsed = time.monotonic() - started
    sock.close()
    return received, closed, elapsed


def test_slow_bodies_get_408_and_do_not_starve_health(tmp_path: Path) -> None:
    env = {"CHATKIT_BODY_TIMEOUT": f"{BODY_TIMEOUT:g}"}
    with start_gunicorn(
        tmp_path, env=env, extra_args=["--worker-connections", str(CONNECTIONS)]
    ) as server:
        cookie = cookie_header(logged_in_session(server.url, "alice"))
        body = json.dumps(create_request("hello")).encode()
        socks = [slow_post(server.port, cookie, body) for _ in range(SLOW_SOCKETS)]
        with concurrent.futures.ThreadPoolExecutor(SLOW_SOCKETS + 1) as pool:
            results = [pool.submit(trickle, sock, body) for sock in socks]
            time.sleep(0.5)  # every slow socket holds a connection now
            started = time.monotonic()
            health = requests.get(f"{server.url}/chatkit/health", timeout=30)
            health_seconds = time.monotonic() - started
            outcomes = [r.result(timeout=TRICKLE_FOR + 10) for r in results]
        assert health.status_code == 200
        # Slow sockets are cut off after BODY_TIMEOUT; health waits at most about
        # that long for a free connection (4x margin).
        assert health_seconds < 4 * BODY_TIMEOUT, health_seconds
        for received, closed, elapsed in outcomes:
            status_line = received.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.1 408"), received[:300]
            assert b'"request_timeout"' in received
            assert closed, "the connection stayed open after the 408"
            assert elapsed < 4 * BODY_TIMEOUT, elapsed


def test_streams_past_the_per_user_cap_get_429(tmp_path: Path) -> None:
    cap = 3
    env = {"CHATKIT_MAX_STREAMS_PER_USER": str(cap)}
    with start_gunicorn(tmp_path, env=env) as server:
        alice = logged_in_session(server.url, "alice")
        held: list[requests.Response] = []
        try:
            for _ in range(cap):
                response = alice.post(
                    f"{server.url}/chatkit",
                    json=create_request("words=2000 delay=0.01"),
                    stream=True,
                    timeout=30,
                )
                assert response.status_code == 200
                held.append(response)
            refused = alice.post(
                f"{server.url}/chatkit", json=create_request("words=2"), timeout=30
            )
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "rate_limited"
            assert int(refused.headers["Retry-After"]) > 0
            bob = logged_in_session(server.url, "bob")
            other = bob.post(f"{server.url}/chatkit", json=create_request("words=2"), timeout=30)
            assert other.status_code == 200
        finally:
            for response in held:
                response.close()  # a disconnect: gunicorn closes, the bridge cancels
        # The cancelled streams free their slots (the worker notices at its next write).
        deadline = time.monotonic() + 15
        status = 0
        while time.monotonic() < deadline:
            status = alice.post(
                f"{server.url}/chatkit", json=create_request("words=2"), timeout=30
            ).status_code
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200
