"""Sync code inside respond under a real gunicorn: -k gevent, -k gthread, -k sync, flask run.

The app (tests/sync_app.py) uses Flask-SQLAlchemy models inside ``respond``
through ``sync_to_async`` / ``sync_to_async_iter``, with the ChatKit store on
the same ``db.engine``.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

from bench.sync_stall import neighbour_stall
from tests.reliability.conftest import (
    StreamReader,
    abort,
    list_items,
    raw_request,
)

from .gunicorn import start_flask_run, start_gunicorn
from .http_client import cookie_header, create_request, logged_in_session, sse_events

pytestmark = pytest.mark.integration

APP_SPEC = "tests.sync_app:gunicorn_sync_app()"
# Idle keep-alive connections would hold a stopping worker for the whole
# graceful timeout; nothing here tests shutdown.
WORKERS = {
    "gevent": ["--graceful-timeout", "1"],
    "gthread": ["--threads", "8", "--graceful-timeout", "1"],
}
UPDATED = "thread.item.updated"
# The blocking calls below last 2 s; made on the loop they stall a neighbour that long.
# The helpers must keep it under a quarter of that (idle: ~10 ms): precise figures are
# bench.sync_stall's, this bound only tells working from broken, on a busy machine too.
MAX_STALL = 0.5


def server_env(tmp: Path, db_url: str | None = None) -> dict[str, str]:
    return {
        "CHATKIT_TEST_DB_URL": db_url or f"sqlite:///{tmp / 'app.sqlite3'}",
        "CHATKIT_TEST_MARKER_DIR": str(tmp),
        # Pings every 0.2 s of silence: a client gone while the generator hangs
        # is noticed at the next ping, not 15 s later.
        "CHATKIT_HEARTBEAT_SECONDS": "0.2",
    }


@pytest.fixture(scope="module", params=sorted(WORKERS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    worker_class = request.param
    tmp = tmp_path_factory.mktemp(f"sync-{worker_class}")
    with start_gunicorn(
        tmp,
        app_spec=APP_SPEC,
        env=server_env(tmp),
        worker_class=worker_class,
        extra_args=WORKERS[worker_class],
    ) as running:
        running.worker_class = worker_class  # type: ignore[attr-defined]
        running.tmp = tmp  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def late_answer_port() -> Iterator[int]:
    """A loopback server that answers ``late`` 2 s after each connection (bounded)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            if not stop.wait(2.0):
                conn.sendall(b"late")

    def serve() -> None:
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def stream(session: requests.Session, url: str, text: str) -> list[tuple[float, dict[str, Any]]]:
    response = session.post(f"{url}/chatkit", json=create_request(text), stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return sse_events(response)


def reply(events: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(e["update"]["delta"] for _, e in events if e["type"] == UPDATED)


# -- (a) a blocking call no longer stalls the neighbours -------------------------------


def test_blocking_sleep_through_the_helper_does_not_stall_neighbours(server: Any) -> None:
    result = neighbour_stall(server.url, "op=work block=sleep:2")
    assert result.reply == "slept=2" and result.took >= 2.0
    # On the loop the 2 s call stalls the neighbour 2 s (the control below): 4x the bound.
    assert result.stall < MAX_STALL, f"{server.worker_class}: stalled {result.stall:.2f}s"


def test_blocking_socket_call_through_the_helper_does_not_stall_neighbours(
    server: Any, late_answer_port: int
) -> None:
    result = neighbour_stall(server.url, f"op=work block=socket:{late_answer_port}")
    assert result.reply == "socket=late" and result.took >= 2.0
    assert result.stall < MAX_STALL, f"{server.worker_class}: stalled {result.stall:.2f}s"


def test_control_the_same_call_on_the_loop_stalls_neighbours(server: Any) -> None:
    result = neighbour_stall(server.url, "op=work block=sleep:2 mode=direct")
    assert result.reply == "slept=2"
    assert result.stall > 1.5, f"{server.worker_class}: expected ~2 s, saw {result.stall:.2f}s"


# -- (c) Flask's context inside func; (e) its exceptions --------------------------------


def test_current_user_g_and_request_inside_func(server: Any) -> None:
    session = logged_in_session(server.url, "cora")
    assert reply(stream(session, server.url, "op=work ctx=1")) == (
        "user=cora g=set-in-before-request path=/chatkit"
    )


def test_exception_in_func_is_an_error_event_and_serving_goes_on(server: Any) -> None:
    session = logged_in_session(server.url, "eddy")
    events = [e for _, e in stream(session, server.url, "op=work fail=1")]
    assert events[-1]["type"] == "error", events[-3:]
    assert "Traceback" not in str(events)
    assert reply(stream(session, server.url, "op=work ctx=1")).startswith("user=eddy")
    assert reply(stream(session, server.url, "words=2")) == "w0 w1 "


# -- (d) disconnect during sync_to_async_iter -----------------------------------------


def open_iter_stream(server: Any, user: str, text: str, deltas: int) -> tuple[Any, StreamReader]:
    session = logged_in_session(server.url, user)
    reader = StreamReader(raw_request(server.port, cookie_header(session), create_request(text)))
    assert reader.read_headers() == 200
    while reader.deltas().count("w") < deltas:
        assert reader.next_event() is not None, reader.events
    return session, reader


def wait_for(predicate: Any, timeout: float) -> float | None:
    """Seconds until predicate() held, None if it never did (polled every 20 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def saved_reply(session: requests.Session, url: str, thread_id: str) -> str | None:
    for item in list_items(session, url, thread_id):
        if item["type"] == "assistant_message":
            return "".join(c["text"] for c in item["content"])
    return None


def test_disconnect_closes_the_generator_and_persists_the_partial_reply(server: Any) -> None:
    marker = server.tmp / f"closed-{server.worker_class}"
    session, reader = open_iter_stream(
        server, "dina", f"op=iter n=200 delay=0.05 marker={marker.name}", deltas=5
    )
    thread_id = reader.thread_id()
    abort(reader.sock)
    assert wait_for(marker.exists, 10) is not None, "the generator's finally never ran"
    assert marker.read_text().split()[0] in ("GeneratorExit", "GreenletExit")
    # A checkpoint taken mid-reply may hold fewer words until the final save lands.
    def saved_all_read() -> bool:
        saved = saved_reply(session, server.url, thread_id)
        return saved is not None and saved.startswith("w0 w1 w2 w3 w4 ")

    assert wait_for(saved_all_read, 10) is not None
    saved = saved_reply(session, server.url, thread_id)
    assert saved is not None and saved.startswith("w0 w1 w2 w3 w4 ") and saved.count("w") < 200


def test_disconnect_while_the_generator_blocks_does_not_wait_for_it(server: Any) -> None:
    """Blocked in a HANG s call at disconnect: the partial reply is saved at once; the
    generator is killed at once (gevent) or closed when the call returns (threads).
    "At once" is < HANG / 4: waiting for the call would take HANG s."""
    hang = 8.0
    marker = server.tmp / f"hung-{server.worker_class}"
    session, reader = open_iter_stream(
        server, "hank", f"op=iter n=50 delay=0.01 hang_at=3 hang={hang:g} marker={marker.name}",
        deltas=3,
    )
    thread_id = reader.thread_id()
    hanging = marker.with_name(f"{marker.name}.hanging")
    assert wait_for(hanging.exists, 10) is not None, "the generator never reached its hang"
    abort(reader.sock)
    # Until the final save lands, a checkpoint taken between two words may be what
    # the thread holds: wait for the whole partial reply, not for any.
    saved_in = wait_for(lambda: saved_reply(session, server.url, thread_id) == "w0 w1 w2 ", 10)
    assert saved_in is not None and saved_in < hang / 4, f"partial reply saved after {saved_in}s"
    assert saved_reply(session, server.url, thread_id) == "w0 w1 w2 "
    closed_in = wait_for(marker.exists, hang + 10)
    assert closed_in is not None, "the generator's finally never ran"
    ended_by = marker.read_text().split()[0]
    if server.worker_class == "gevent":  # its greenlet was killed inside the call
        assert ended_by == "GreenletExit" and closed_in < hang / 4, (ended_by, closed_in)
    else:  # the thread's next() returned after the call, then it was closed
        assert ended_by == "GeneratorExit" and closed_in > hang / 4, (ended_by, closed_in)


# -- (b) Flask-SQLAlchemy models inside respond, store on db.engine -------------------


@pytest.mark.parametrize("worker_class", sorted(WORKERS))
def test_flask_sqlalchemy_models_in_respond(
    tmp_path: Path, store_url: str, worker_class: str
) -> None:
    with start_gunicorn(
        tmp_path,
        app_spec=APP_SPEC,
        env=server_env(tmp_path, store_url),
        worker_class=worker_class,
        extra_args=WORKERS[worker_class],
    ) as server:
        session = logged_in_session(server.url, "mona")
        first = stream(session, server.url, "op=work db=1 note=first")
        assert reply(first) == "notes=1"
        thread_id = next(e["thread"]["id"] for _, e in first if e["type"] == "thread.created")

        def add_note(index: int) -> str:
            return reply(stream(session, server.url, f"op=work db=1 note=n{index}"))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(add_note, range(8)))
        counts = [int(r.removeprefix("notes=")) for r in replies]  # each saw its own insert
        assert all(2 <= count <= 9 for count in counts) and max(counts) == 9, counts
        notes = requests.get(f"{server.url}/_test/notes/mona", timeout=10).json()["notes"]
        assert sorted(notes) == sorted(["first", *(f"n{i}" for i in range(8))])
        assert saved_reply(session, server.url, thread_id) == "notes=1"
    # One database holds both the app's model and ChatKit's tables.
    engine = sqlalchemy.create_engine(store_url)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"note", "chatkit_threads", "chatkit_items"} <= tables


# -- the other ways to serve: -k sync, flask run ------------------------------------------


def smoke(url: str, tmp: Path) -> None:
    session = logged_in_session(url, "sam")
    assert reply(stream(session, url, "op=work ctx=1 db=1")) == (
        "user=sam g=set-in-before-request path=/chatkit notes=1"
    )
    assert reply(stream(session, url, "op=iter n=3 marker=smoke")) == "w0 w1 w2 "
    assert (tmp / "smoke").read_text().startswith("exhausted")


def test_helpers_under_the_sync_worker(tmp_path: Path) -> None:
    with start_gunicorn(
        tmp_path,
        app_spec=APP_SPEC,
        env=server_env(tmp_path),
        worker_class="sync",
        extra_args=["--graceful-timeout", "1"],
    ) as server:
        smoke(server.url, tmp_path)


def test_helpers_under_flask_run(tmp_path: Path) -> None:
    with start_flask_run(tmp_path, APP_SPEC, server_env(tmp_path)) as url:
        smoke(url, tmp_path)
