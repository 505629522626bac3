"""200 clients drop their streams abruptly: every partial reply is kept, nothing leaks.

Why this fails when cancellation is broken (checked by reasoning and by the
``finish`` control test below, which runs the very same checks against a
server that does *not* cancel):

* if the bridge's ``close()`` never ran or did not ``task.cancel()`` the pump
  (e.g. it only ``aclose()``-d the generator, or the pump kept running), respond
  would never see ``CancelledError``: the ``cancelled`` counter stays flat,
  every thread ends up with the *full* 60-word reply and no hidden "cancelled"
  item -> ``stream_problems`` reports every thread;
* if ChatKit's ``handle_stream_cancelled`` were re-cancelled (anyio-style) the
  partial assistant message or the hidden item would be missing;
* if a cancelled pump task or its channel lingered, ``/_test/loop`` would
  count it, and leaked sockets/threads show in ``/proc/<pid>``;
* if the worker crashed or got recycled, its pid would change.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gunicorn import RunningServer

from .conftest import (
    StreamReader,
    abort,
    cookie_of,
    create_payload,
    create_thread,
    item_text,
    list_threads,
    login,
    loop_tasks,
    native_threads,
    observations,
    open_fds,
    raw_request,
    serve,
    store_items,
    wait_until,
)

WORDS = 60
DELAY = 0.05  # a 3 s stream; clients drop after 1..25 deltas (<= ~1.25 s in)
FULL_TEXT = "".join(f"w{i} " for i in range(WORDS))
STREAM_TEXT = f"words={WORDS} delay={DELAY}"
USERS = [f"storm{i}" for i in range(4)]
SERVER_ENV = {
    # Every store call really awaits, like network I/O: the case where an
    # anyio-style re-cancel loses partial replies (see DESIGN.md).
    "CHATKIT_TEST_STORE_DELAY": "0.005",
    "CHATKIT_CANCEL_TIMEOUT": "10",
    # 200 streams from 4 users at once: the per-user cap (20) is not what this measures.
    "CHATKIT_MAX_STREAMS_PER_USER": "1000",
}


@dataclass
class Dropped:
    user: str
    thread_id: str | None
    received: str
    status: int | None
    finished: bool  # the client saw the whole reply (it should never have)


def drop_after(port: int, cookies: dict[str, str], user: str, deltas: int, reset: bool,
               start: threading.Barrier) -> Dropped:
    start.wait(timeout=30)
    sock = raw_request(port, cookies[user], create_payload(STREAM_TEXT), timeout=60)
    reader = StreamReader(sock)
    finished = False
    try:
        status = reader.read_headers()
        while status == 200 and reader.deltas().count(" ") < deltas:
            event = reader.next_event()
            if event is None or (event.get("type") == "thread.item.done"
                                 and event["item"]["type"] == "assistant_message"):
                finished = True
                break
    finally:
        abort(sock, reset=reset)
    return Dropped(user, reader.thread_id(), reader.deltas(), status, finished)


def storm(server: RunningServer, count: int, seed: int) -> list[Dropped]:
    cookies = {u: cookie_of(login(server.url, u)) for u in USERS}
    rng = random.Random(seed)
    plan = [(USERS[i % len(USERS)], rng.randint(1, 25), rng.random() < 0.75)
            for i in range(count)]
    start = threading.Barrier(count)
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(drop_after, server.port, cookies, user, deltas, reset, start)
                   for user, deltas, reset in plan]
        return [f.result(timeout=120) for f in futures]


def stream_problems(server: RunningServer, dropped: Dropped) -> list[str]:
    """What is wrong with one dropped stream's persisted thread (empty: all good)."""
    items = store_items(server.url, dropped.user, str(dropped.thread_id))
    kinds = [i["type"] for i in items]
    problems = []
    if kinds[:1] != ["user_message"] or item_text(items[0]) != STREAM_TEXT:
        problems.append(f"user message missing: {kinds}")
    replies = [i for i in items if i["type"] == "assistant_message"]
    if len(replies) != 1:
        problems.append(f"{len(replies)} assistant messages: {kinds}")
    else:
        text = item_text(replies[0])
        if not text.startswith(dropped.received):
            problems.append(f"persisted {text!r} does not extend received {dropped.received!r}")
        if text == FULL_TEXT:
            problems.append("the whole reply was generated: the stream was never cancelled")
    hidden = [i for i in items if i["type"] == "sdk_hidden_context"]
    if len(hidden) != 1 or "cancelled" not in str(hidden[0].get("content")):
        problems.append(f"no hidden 'cancelled' item: {kinds}")
    return problems


def worker_state(server: RunningServer, pid: int) -> dict[str, int]:
    return {"tasks": loop_tasks(server.url), "threads": native_threads(pid),
            "fds": open_fds(pid)}


def settled(server: RunningServer, pid: int, baseline: dict[str, int]) -> bool:
    """Back to the baseline: no task on the loop, no extra native thread or fd."""
    now = worker_state(server, pid)
    return (now["tasks"] == baseline["tasks"] and now["threads"] <= baseline["threads"]
            and now["fds"] <= baseline["fds"])


@pytest.mark.timeout(240)
def test_disconnect_storm_persists_every_partial_reply_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    with serve(tmp_path, env=SERVER_ENV) as server:
        (pid,) = server.worker_pids()
        session = login(server.url, "storm-check")
        # Warm up every lazily created piece (loop, executor, store) with full
        # streams and a few drops, then take the baseline.
        for _ in range(3):
            create_thread(session, server.url, "words=3")
        warm = storm(server, 4, seed=1)
        assert wait_until(lambda: observations(server.url)["cancelled"] == 4, 20)
        assert wait_until(lambda: loop_tasks(server.url) == 0, 20)
        baseline = worker_state(server, pid)
        cancelled_before = observations(server.url)["cancelled"]
        assert all(d.status == 200 and d.thread_id for d in warm)

        started = time.monotonic()
        dropped = storm(server, 200, seed=2026)
        storm_seconds = time.monotonic() - started

        assert [d for d in dropped if d.status != 200 or not d.thread_id] == []
        # Every client dropped a stream in progress: it got >= 1 delta, never the end.
        assert [d for d in dropped if d.finished or not d.received] == []

        # respond saw CancelledError exactly once per dropped stream.
        def cancelled() -> int:
            return int(observations(server.url)["cancelled"]) - cancelled_before

        wait_until(lambda: cancelled() >= len(dropped), 30, 0.25)
        assert cancelled() == len(dropped), f"storm took {storm_seconds:.1f}s"

        # Every partial reply persisted (a prefix extended at most by what was
        # in flight), with the SDK's hidden "cancelled" item.
        problems = {d.thread_id: p for d in dropped if (p := stream_problems(server, d))}
        assert problems == {}

        # Nothing leaked: no task left on the loop, no extra native thread, no socket.
        assert wait_until(lambda: settled(server, pid, baseline), 30, 0.5), (
            baseline, worker_state(server, pid))

        # The same worker keeps serving.
        _, events = create_thread(session, server.url, "words=5")
        assert [e["type"] for e in events].count("thread.item.updated") == 5
        assert server.worker_pids() == [pid]
        log = server.log()
        assert "Traceback" not in log
        assert "did not finish within CHATKIT_CANCEL_TIMEOUT" not in log


@pytest.mark.timeout(120)
def test_clients_gone_before_the_first_byte_leave_nothing_behind(tmp_path: Path) -> None:
    """Clients that send a stream request and reset at once, before any response.

    On the default SQLAlchemyStore: its writes run to completion on a pool
    thread even when the awaiting task is cancelled, so a thread is never left
    without its user message. (With a store whose writes are themselves
    cancellable — e.g. the in-memory test store with a delay — a reset right
    after ``thread.created`` leaves an empty thread: the SDK saves the thread,
    yields ``thread.created``, and only then awaits the user message's write,
    outside ``respond`` where no ``handle_stream_cancelled`` runs.)
    """
    database_url = f"sqlite:///{tmp_path / 'early.sqlite3'}"
    with serve(tmp_path, database_url=database_url, env=SERVER_ENV) as server:
        (pid,) = server.worker_pids()
        session = login(server.url, "early")
        create_thread(session, server.url, "words=3")
        cookie = cookie_of(session)

        def reset_burst(count: int) -> None:
            for _ in range(count):
                abort(raw_request(server.port, cookie, create_payload(STREAM_TEXT)))
            # The worker may still be accepting the burst: wait for a quiet
            # loop, seen idle on several probes in a row.
            idle = [0]

            def quiet() -> bool:
                idle[0] = idle[0] + 1 if loop_tasks(server.url) == 0 else 0
                return idle[0] >= 4

            assert wait_until(quiet, 30, 0.25)

        # The store's pool (native threads, connections) grows lazily up to its
        # configured size, so compare burst to burst: the counts must stop
        # growing. A leak of one thread or fd per dropped stream would add ~40
        # per burst, every burst, and never settle.
        history = [worker_state(server, pid)]
        for _ in range(5):
            reset_burst(40)
            history.append(worker_state(server, pid))
            last, now = history[-2], history[-1]
            if now["threads"] <= last["threads"] and now["fds"] <= last["fds"] + 4:
                break
        else:
            raise AssertionError(f"the worker keeps growing burst after burst: {history}")
        assert all(state["tasks"] == 0 for state in history), history

        # Whatever threads were created are whole: the user message is stored.
        threads = list_threads(session, server.url)
        empty = [t["id"] for t in threads
                 if [i["type"] for i in store_items(server.url, "early", t["id"])][:1]
                 != ["user_message"]]
        assert empty == [], f"{len(empty)} of {len(threads)} threads have no user message"
        create_thread(session, server.url, "words=2")
        assert server.worker_pids() == [pid]
        assert "Traceback" not in server.log()


@pytest.mark.timeout(120)
def test_control_without_cancellation_the_storm_checks_fail(tmp_path: Path) -> None:
    """Mutation check: with CHATKIT_ON_DISCONNECT=finish (no cancel), the storm's
    checks must flag every stream — proof that they detect a bridge that does
    not propagate cancellation."""
    with serve(tmp_path, env={**SERVER_ENV, "CHATKIT_ON_DISCONNECT": "finish"}) as server:
        dropped = storm(server, 20, seed=7)
        assert all(d.status == 200 and d.received and not d.finished for d in dropped)
        # The detached streams run to completion (3 s) and persist the whole reply.
        def all_complete() -> bool:
            return all(any(i["type"] == "assistant_message" for i in
                           store_items(server.url, d.user, str(d.thread_id))) for d in dropped)

        assert wait_until(all_complete, 30, 0.5)
        assert observations(server.url)["cancelled"] == 0
        flagged = [d for d in dropped if stream_problems(server, d)]
        assert len(flagged) == len(dropped)
