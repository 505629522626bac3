"""The endpoint under real servers: gunicorn gevent/gthread/sync and `flask run`."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .gunicorn import start_flask_run, start_gunicorn
from .http_client import (
    cookie_header,
    create_request,
    logged_in_session,
    raw_stream_request,
    recv_until,
    reset,
    sse_events,
    user_input,
)

pytestmark = pytest.mark.integration


def stream_thread(
    session: requests.Session, url: str, text: str
) -> list[tuple[float, dict[str, Any]]]:
    response = session.post(f"{url}/chatkit", json=create_request(text), stream=True, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return sse_events(response)


def items_of(session: requests.Session, url: str, thread_id: str) -> list[dict[str, Any]]:
    response = session.post(
        f"{url}/chatkit",
        json={"type": "items.list", "params": {"thread_id": thread_id, "order": "asc"}},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


@pytest.fixture(scope="module")
def gevent_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("gevent")
    # One user holds up to 200 streams here: the per-user cap is not what these tests measure.
    env = {"CHATKIT_TEST_STORE_DELAY": "0.001", "CHATKIT_MAX_STREAMS_PER_USER": "1000"}
    with start_gunicorn(tmp, env=env) as server:
        yield server


def test_streams_incrementally_under_gevent(gevent_server: Any) -> None:
    session = logged_in_session(gevent_server.url, "alice")
    start = time.monotonic()
    events = stream_thread(session, gevent_server.url, "words=6 delay=0.25")
    first_at, last_at = events[0][0] - start, events[-1][0] - start
    assert events[0][1]["type"] == "thread.created"
    # Relative, not absolute, timing: buffering would deliver everything at once.
    assert first_at < last_at - 1.0, f"first event at {first_at:.2f}s: the response was buffered"
    assert last_at - first_at > 1.0, "all events arrived together: not streamed"
    deltas = [e["update"]["delta"] for _, e in events if e["type"] == "thread.item.updated"]
    assert deltas == [f"w{i} " for i in range(6)]


def test_request_context_visible_in_respond_under_gevent(gevent_server: Any) -> None:
    session = logged_in_session(gevent_server.url, "carol")
    stream_thread(session, gevent_server.url, "words=1")
    seen = session.get(f"{gevent_server.url}/_test/observations", timeout=10).json()
    mine = [o for o in seen["observations"] if o["context_user"] == "carol"][-1]
    assert mine["user"] == "carol"  # Flask-Login's current_user inside respond
    assert mine["g_marker"] == "set-in-before-request"  # flask.g
    assert mine["path"] == "/chatkit"  # flask.request


def test_disconnect_cancels_and_persists_partial_reply(gevent_server: Any) -> None:
    session = logged_in_session(gevent_server.url, "dave")
    before = session.get(f"{gevent_server.url}/_test/observations", timeout=10).json()["cancelled"]
    sock = raw_stream_request(
        gevent_server.url, cookie_header(session), create_request("words=100 delay=0.05")
    )
    try:
        received = recv_until(sock, lambda seen: seen.count(b"thread.item.updated") >= 5)
    finally:
        reset(sock)  # abrupt close (RST), like a browser tab going away; on failure too

    thread_id = json.loads(received.split(b"data: ", 1)[1].split(b"\n", 1)[0])["thread"]["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        items = items_of(session, gevent_server.url, thread_id)
        if any(i["type"] == "assistant_message" for i in items):
            break
        time.sleep(0.2)
    assistant = [i for i in items if i["type"] == "assistant_message"]
    assert len(assistant) == 1, items
    partial = assistant[0]["content"][0]["text"]
    assert partial.startswith("w0 w1 w2 w3 w4 ") and partial.count("w") < 100
    after = session.get(f"{gevent_server.url}/_test/observations", timeout=10).json()["cancelled"]
    assert after == before + 1, "respond() never saw CancelledError"


def test_200_concurrent_streams_on_one_gevent_worker(gevent_server: Any) -> None:
    session = logged_in_session(gevent_server.url, "erin")
    cookie = cookie_header(session)
    count, words, delay = 200, 10, 0.1

    def one(_: int) -> int:
        sock = raw_stream_request(
            gevent_server.url, cookie, create_request(f"words={words} delay={delay}")
        )
        data = b""
        with sock:
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        return data.count(b'"thread.item.updated"')

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        deltas = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - start
    assert deltas == [words] * count
    # Served concurrently: 200 x 1 s of streaming in far less than 200 s.
    assert elapsed < 30, f"{elapsed:.1f}s: streams were serialised"
    threads = session.post(
        f"{gevent_server.url}/chatkit",
        json={"type": "threads.list", "params": {"limit": 100}},
        timeout=30,
    ).json()
    assert len(threads["data"]) == 100 and threads["has_more"]


def test_error_statuses_over_http(gevent_server: Any) -> None:
    url = f"{gevent_server.url}/chatkit"
    anonymous = requests.post(url, json={"type": "threads.list", "params": {}}, timeout=10)
    session = logged_in_session(gevent_server.url, "frank")
    cases = [
        (anonymous, 401),
        (
            session.post(
                url, data=b"{nope", headers={"Content-Type": "application/json"}, timeout=10
            ),
            400,
        ),
        (session.post(url, json={"type": "nope", "params": {}}, timeout=10), 400),
        (
            session.post(
                url,
                json={"type": "threads.get_by_id", "params": {"thread_id": "thr_x"}},
                timeout=10,
            ),
            404,
        ),
        (
            session.post(
                url,
                json={"type": "threads.list", "params": {}},
                headers={"Origin": "https://evil.example"},
                timeout=10,
            ),
            403,
        ),
        (session.get(url, timeout=10), 405),
        (
            session.post(
                url,
                data=b"x" * (5 * 1024 * 1024),
                headers={"Content-Type": "application/json"},
                timeout=30,
            ),
            413,
        ),
        (session.post(url, data=b"{}", headers={"Content-Type": "text/plain"}, timeout=10), 415),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        assert "error" in response.json() and "Traceback" not in response.text
    # A foreign thread reads exactly like an unknown one, before any stream starts.
    owner = logged_in_session(gevent_server.url, "grace")
    thread_id = stream_thread(owner, gevent_server.url, "words=1")[0][1]["thread"]["id"]
    foreign = session.post(
        url,
        json={
            "type": "threads.add_user_message",
            "params": {"thread_id": thread_id, "input": user_input("x")},
        },
        timeout=10,
    )
    assert foreign.status_code == 404 and foreign.headers["Content-Type"].startswith(
        "application/json"
    )
    assert len(items_of(owner, gevent_server.url, thread_id)) == 2


def test_heartbeat_during_silence(tmp_path: Path) -> None:
    env = {"CHATKIT_HEARTBEAT_SECONDS": "0.2"}
    with start_gunicorn(tmp_path, env=env) as server:
        session = logged_in_session(server.url, "heidi")
        response = session.post(
            f"{server.url}/chatkit",
            json=create_request("words=2 delay=1.0"),
            stream=True,
            timeout=30,
        )
        body = b"".join(response.iter_content(None))
    assert body.count(b": ping\n\n") >= 4
    assert body.count(b'"thread.item.updated"') == 2


def test_on_disconnect_finish_completes_reply(tmp_path: Path) -> None:
    env = {"CHATKIT_ON_DISCONNECT": "finish"}
    with start_gunicorn(tmp_path, env=env) as server:
        session = logged_in_session(server.url, "ivan")
        sock = raw_stream_request(
            server.url, cookie_header(session), create_request("words=20 delay=0.05")
        )
        try:
            received = recv_until(sock, lambda seen: b"thread.item.updated" in seen)
        finally:
            reset(sock)
        thread_id = json.loads(received.split(b"data: ", 1)[1].split(b"\n", 1)[0])["thread"]["id"]
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline and text.count("w") < 20:
            assistant = [
                i
                for i in items_of(session, server.url, thread_id)
                if i["type"] == "assistant_message"
            ]
            text = assistant[0]["content"][0]["text"] if assistant else ""
            time.sleep(0.2)
        assert text == "".join(f"w{i} " for i in range(20))
        cancelled = session.get(f"{server.url}/_test/observations", timeout=10).json()["cancelled"]
        assert cancelled == 0


@pytest.mark.parametrize(
    ("worker_class", "extra"),
    [("gthread", ["--threads", "8"]), ("sync", [])],
)
def test_other_worker_classes_stream_and_cancel(
    tmp_path: Path, worker_class: str, extra: list[str]
) -> None:
    with start_gunicorn(tmp_path, worker_class=worker_class, extra_args=extra) as server:
        session = logged_in_session(server.url, "judy")
        events = stream_thread(session, server.url, "words=4 delay=0.25")
        assert events[-1][0] - events[0][0] > 0.6  # spread out: streamed, not buffered
        sock = raw_stream_request(
            server.url, cookie_header(session), create_request("words=100 delay=0.05")
        )
        try:
            recv_until(sock, lambda seen: seen.count(b"thread.item.updated") >= 3)
        finally:
            reset(sock)
        deadline = time.monotonic() + 20
        cancelled = 0
        while time.monotonic() < deadline and cancelled < 1:
            cancelled = session.get(f"{server.url}/_test/observations", timeout=10).json()[
                "cancelled"
            ]
            time.sleep(0.2)
        assert cancelled == 1


def test_flask_dev_server_streams(tmp_path: Path) -> None:
    with start_flask_run(tmp_path, "tests.apps:gunicorn_app()") as url:
        session = logged_in_session(url, "ken")
        events = stream_thread(session, url, "words=4 delay=0.25")
        assert events[-1][0] - events[0][0] > 0.6  # spread out: streamed, not buffered
        assert sum(e["type"] == "thread.item.updated" for _, e in events) == 4
