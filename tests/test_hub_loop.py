"""The loop as a greenlet on the gevent hub (bridge/hub_loop.py), under a real gunicorn.

Under ``-k gevent`` the worker's asyncio loop runs on the hub's own thread unless
``CHATKIT_LOOP=thread``; either way streams work, views see no running loop,
and a loop that always has work ready still lets every other request run.
"""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
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

APP = "tests.hub_loop_app:gunicorn_app()"


def open_stream(url: str, session: requests.Session, text: str) -> socket.socket:
    """A raw-socket ``threads.create`` stream of ``session``'s user; the caller reads it."""
    return raw_stream_request(url, cookie_header(session), create_request(text))


def database(tmp_path: Path) -> dict[str, str]:
    return {"CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'chatkit.sqlite3'}"}


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("loop_env", "on_hub"), [(None, True), ("thread", False)])
def test_where_the_loop_runs_and_streams_in_both(
    tmp_path: Path, loop_env: str | None, on_hub: bool
) -> None:
    env = database(tmp_path) | ({"CHATKIT_LOOP": loop_env} if loop_env else {})
    with start_gunicorn(tmp_path, APP, env=env) as server:
        where = requests.get(f"{server.url}/_test/loop", timeout=30)
        assert where.json() == {"same_thread": on_hub}
        alice = logged_in_session(server.url, "alice")
        reply = alice.post(f"{server.url}/chatkit", json=create_request("words=5"), timeout=30)
        assert reply.status_code == 200
        assert reply.text.count("text_delta") == 5 and "thread.item.done" in reply.text
        # asyncio sockets on the loop (what an AsyncOpenAI client does), served by this
        # very worker: the loop waits on the socket while the hub answers the GET.
        for _ in range(3):
            fetched = alice.post(
                f"{server.url}/chatkit",
                json=create_request(f"fetch=127.0.0.1:{server.port}"),
                timeout=30,
            )
            assert fetched.status_code == 200
            assert '"delta":"{\\"ok\\":true}"' in fetched.text, fetched.text[-500:]
        assert "Traceback" not in server.log()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_views_see_no_running_loop_while_streams_run(tmp_path: Path) -> None:
    with start_gunicorn(tmp_path, APP, env=database(tmp_path)) as server:
        alice = logged_in_session(server.url, "alice")
        socks = [open_stream(server.url, alice, "words=40 delay=0.1") for _ in range(5)]
        try:
            for sock in socks:
                read_until(sock, b"text_delta", timeout=30)  # every stream is open on the loop now
            views = requests.get(f"{server.url}/_test/views", timeout=30)
            assert views.status_code == 200, server.log()[-4000:]
            assert views.json() == {"running_loop": False, "asyncio_run": 42, "async_to_sync": 42}
            # A store read answered on the request's greenlet (no loop running there).
            listed = alice.post(
                f"{server.url}/chatkit", json={"type": "threads.list", "params": {}}, timeout=30
            )
            assert listed.status_code == 200 and len(listed.json()["data"]) == 5
        finally:
            for sock in socks:
                sock.close()
        assert "Traceback" not in server.log()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_views_own_asyncio_loop_keeps_running_while_the_workers_loop_runs(
    tmp_path: Path,
) -> None:
    """``asyncio.run`` and ``async_to_sync`` in a view wait cooperatively, and the worker's
    loop runs in those waits: the view's loop must still be the running one when it
    resumes, and a stream that starts meanwhile must stay the worker loop's (its async
    generators are not closed when the view's loop ends)."""
    with start_gunicorn(tmp_path, APP, env=database(tmp_path)) as server:
        alice = logged_in_session(server.url, "alice")
        spinner = open_stream(server.url, alice, "spin=6")  # the loop always has work
        late = None
        try:
            read_until(spinner, b"spinning", timeout=30)
            with ThreadPoolExecutor(1) as pool:
                nested = pool.submit(
                    requests.get, f"{server.url}/_test/nested?seconds=1.5", timeout=60
                )
                time.sleep(0.3)  # the view's loops are waiting now: start a stream
                late = open_stream(server.url, alice, "words=20 delay=0.1")
                answer = nested.result(timeout=60)
            assert answer.status_code == 200, server.log()[-4000:]
            assert answer.json() == {"asyncio_run": True, "async_to_sync": True}
            streamed = read_until(late, b"thread.item.done", timeout=30)
            assert streamed.count(b"text_delta") == 20
        finally:
            spinner.close()
            if late is not None:
                late.close()
        log = server.log()
        # The view's loop would otherwise try to close the late stream's generators.
        assert "Traceback" not in log and "asynchronous generator" not in log, log[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_loop_always_busy_still_lets_other_requests_run(tmp_path: Path) -> None:
    with start_gunicorn(tmp_path, APP, env=database(tmp_path)) as server:
        alice = logged_in_session(server.url, "alice")
        sock = open_stream(server.url, alice, "spin=20")
        try:
            # Sent just before respond starts spinning: the hub wrote it meanwhile.
            seen = read_until(sock, b"spinning", timeout=30)
            ping = requests.get(f"{server.url}/_test/ping", timeout=30)
            assert ping.json() == {"ok": True}
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                seen += sock.recv(65536)
            assert b"spun" not in seen  # both answered while the loop still spun
        finally:
            sock.close()
