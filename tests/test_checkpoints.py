"""Replies survive a crash: checkpoints of a streaming reply (CHATKIT_CHECKPOINT_SECONDS).

Fails when: a checkpoint is not written while the reply streams, is written under
another id than the one the client saw, the final item does not replace it (two rows,
a DuplicateIdError, the checkpoint's short text kept), a checkpoint overwrites a final
item, checkpoints happen per event instead of per interval, or a failing checkpoint
write lets the reply stream on to its end.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from chatkit.types import AssistantMessageContent, AssistantMessageItem
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc

from flask_chatkit import RequestContext, SQLAlchemyStore
from flask_chatkit.storage.sql import CHECKPOINT_FLAG, DuplicateIdError
from tests.apps import create_test_app
from tests.helpers import created_thread_id, login_as, sse_data, thread_id_of
from tests.http_client import create_request

CTX = RequestContext(user_id="ada")


def reply(text: str, item_id: str = "msg_1", thread_id: str = "thr_1") -> AssistantMessageItem:
    return AssistantMessageItem(
        id=item_id,
        thread_id=thread_id,
        created_at=datetime(2024, 1, 1),
        content=[AssistantMessageContent(text=text)],
    )


def test_checkpoint_rows_are_replaced_by_the_final_item(sql_store: SQLAlchemyStore) -> None:
    asyncio.run(_replaced_by_the_final_item(sql_store))


async def _replaced_by_the_final_item(sql_store: SQLAlchemyStore) -> None:
    await sql_store.save_checkpoint("thr_1", reply("w0 "), CTX)
    await sql_store.save_checkpoint("thr_1", reply("w0 w1 "), CTX)  # the same row, updated
    page = await sql_store.load_thread_items("thr_1", None, 10, "asc", CTX)
    assert [(i.id, i.content[0].text) for i in page.data] == [("msg_1", "w0 w1 ")]
    # The final add replaces the checkpoint: one row, the full text, no flag left.
    await sql_store.add_thread_item("thr_1", reply("w0 w1 w2 "), CTX)
    page = await sql_store.load_thread_items("thr_1", None, 10, "asc", CTX)
    assert [(i.id, i.content[0].text) for i in page.data] == [("msg_1", "w0 w1 w2 ")]
    with sql_store.engine.connect() as conn:
        payloads = [p for (p,) in conn.exec_driver_sql("SELECT payload FROM chatkit_items")]
    assert len(payloads) == 1
    payload = payloads[0] if isinstance(payloads[0], dict) else json.loads(payloads[0])
    assert CHECKPOINT_FLAG not in payload
    # A final row is final: another add still clashes, a late checkpoint changes nothing.
    with pytest.raises(DuplicateIdError):
        await sql_store.add_thread_item("thr_1", reply("other"), CTX)
    await sql_store.save_checkpoint("thr_1", reply("w0 "), CTX)
    item = await sql_store.load_item("thr_1", "msg_1", CTX)
    assert item.content[0].text == "w0 w1 w2 "
    # Another owner's checkpoint with the same ids is another row.
    await sql_store.save_checkpoint("thr_1", reply("bob's"), RequestContext(user_id="bob"))
    assert (await sql_store.load_item("thr_1", "msg_1", CTX)).content[0].text == "w0 w1 w2 "


def test_save_item_over_a_checkpoint_clears_it(sql_store: SQLAlchemyStore) -> None:
    asyncio.run(_save_item_clears(sql_store))


async def _save_item_clears(sql_store: SQLAlchemyStore) -> None:
    await sql_store.save_checkpoint("thr_1", reply("w0 "), CTX)
    await sql_store.save_item("thr_1", reply("replaced"), CTX)
    await sql_store.save_checkpoint("thr_1", reply("late"), CTX)  # no longer a checkpoint
    assert (await sql_store.load_item("thr_1", "msg_1", CTX)).content[0].text == "replaced"


def test_many_checkpoints_are_one_statement_and_each_row_is_there(
    sql_store: SQLAlchemyStore,
) -> None:
    """save_checkpoints: 50 replies in one INSERT .. ON CONFLICT; rows of other owners apart."""
    inserts: list[bool] = []

    def count(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CHATKIT_ITEMS"):
            inserts.append(many)

    bob = RequestContext(user_id="bob")
    rows: list[tuple[str, Any, Any]] = [
        (f"thr_{n}", reply(f"text {n}", thread_id=f"thr_{n}"), CTX) for n in range(50)
    ]
    rows.append(("thr_0", reply("bob's", thread_id="thr_0"), bob))

    async def main() -> None:
        await sql_store.save_checkpoints(rows)
        texts = [
            (await sql_store.load_item(f"thr_{n}", "msg_1", CTX)).content[0].text for n in range(50)
        ]
        assert texts == [f"text {n}" for n in range(50)]
        assert (await sql_store.load_item("thr_0", "msg_1", bob)).content[0].text == "bob's"

    sa_event.listen(sql_store.engine, "before_cursor_execute", count)
    try:
        asyncio.run(main())
    finally:
        sa_event.remove(sql_store.engine, "before_cursor_execute", count)
    assert inserts == [True], inserts  # one executemany, not 51 statements


def test_a_failed_checkpoint_write_stores_none_of_its_rows(
    sql_store: SQLAlchemyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sql_store._save_checkpoints
    calls: list[int] = []

    def fail_first(rows: Any) -> None:
        calls.append(len(rows))
        if len(calls) == 1:
            raise sa_exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
        real(rows)

    monkeypatch.setattr(sql_store, "_save_checkpoints", fail_first)
    rows = [("thr_1", reply("w0 ", item_id=f"msg_{n}"), CTX) for n in range(10)]

    async def main() -> None:
        with pytest.raises(sa_exc.OperationalError):
            await sql_store.save_checkpoints(rows)
        page = await sql_store.load_thread_items("thr_1", None, 20, "asc", CTX)
        assert page.data == []
        await sql_store.save_checkpoint("thr_1", reply("w0 w1 "), CTX)
        assert (await sql_store.load_item("thr_1", "msg_1", CTX)).content[0].text == "w0 w1 "

    asyncio.run(main())
    assert calls == [10, 1]


class _RecordingCheckpoints:
    """A store's save_checkpoints that records each call and can be held or failed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def save_checkpoints(self, rows: Any) -> None:
        self.calls.append([item.content[0].text for _, item, _ in rows])
        self.called.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail


def _tracked_streams(count: int) -> list[Any]:
    from chatkit.types import ThreadItemAddedEvent

    from flask_chatkit.web.endpoint import _Checkpoints

    streams = []
    for n in range(count):
        stream = _Checkpoints(server=None, context=CTX)  # type: ignore[arg-type]
        stream.track(ThreadItemAddedEvent(item=reply(f"reply {n}", item_id=f"msg_{n}")))
        streams.append(stream)
    return streams


def test_every_stream_of_a_worker_is_checkpointed_in_one_write_per_tick() -> None:
    from flask_chatkit.web.endpoint import _Ticker

    async def main() -> None:
        store = _RecordingCheckpoints()
        ticker = _Ticker(store, interval=0.05)
        streams = _tracked_streams(50)
        for stream in streams:
            ticker.add(stream)
        await asyncio.wait_for(store.called.wait(), 5)
        assert [sorted(call) for call in store.calls] == [sorted(f"reply {n}" for n in range(50))]
        await asyncio.sleep(0.2)  # more ticks: nothing changed, nothing written
        assert len(store.calls) == 1
        assert all(s.saved == {f"msg_{n}"} for n, s in enumerate(streams))

        # The store is behind: ticks while a write runs are skipped, then catch up.
        store.called.clear()
        store.release.clear()
        streams[3].pending["msg_3"].content[0].text = "reply 3, longer"
        streams[3].changed.add("msg_3")
        await asyncio.wait_for(store.called.wait(), 5)
        streams[4].changed.add("msg_4")
        await asyncio.sleep(0.2)  # four ticks while the write is held
        assert store.calls[1:] == [["reply 3, longer"]]
        store.called.clear()
        store.release.set()
        await asyncio.wait_for(store.called.wait(), 5)
        assert store.calls[2:] == [["reply 4"]]

        # A failed write reaches each stream of it (they end at their next event).
        store.called.clear()
        store.fail = RuntimeError("database is down")
        for n in (5, 6):
            streams[n].changed.add(f"msg_{n}")
        await asyncio.wait_for(store.called.wait(), 5)
        await asyncio.sleep(0)  # the write's outcome reaches the streams
        assert [type(s.failed) for s in streams[5:7]] == [RuntimeError, RuntimeError]
        assert streams[7].failed is None
        for stream in streams:
            ticker.discard(stream)

    asyncio.run(main())


def _delta(index: int, text: str) -> Any:
    """A text delta of msg_1's content part ``index``."""
    from chatkit.types import AssistantMessageContentPartTextDelta, ThreadItemUpdatedEvent

    return ThreadItemUpdatedEvent(
        item_id="msg_1",
        update=AssistantMessageContentPartTextDelta(content_index=index, delta=text),
    )


def test_a_reply_ending_in_an_error_waits_for_the_ticks_write_then_saves_its_newest_text() -> None:
    """The last save must not race the tick's write of the same row (older text last)."""
    from flask_chatkit.web.endpoint import _Ticker

    async def main() -> None:
        store = _RecordingCheckpoints()
        store.release.clear()  # the tick's write is held
        ticker = _Ticker(store, interval=0.05)
        (stream,) = _tracked_streams(1)
        ticker.add(stream)
        await asyncio.wait_for(store.called.wait(), 5)
        stream.pending["msg_0"].content[0].text = "reply 0 and more"
        stream.changed.add("msg_0")
        ticker.discard(stream)  # the reply ended with an error: no final save by ChatKit
        saving = asyncio.ensure_future(stream.save_last(store))
        await asyncio.sleep(0.1)
        assert not saving.done() and len(store.calls) == 1  # waits for the tick's write
        store.release.set()
        assert await asyncio.wait_for(saving, 5) is None
        assert store.calls == [["reply 0"], ["reply 0 and more"]]

    asyncio.run(main())


def test_collected_deltas_give_the_text_the_sdk_would_keep() -> None:
    """The tracker joins deltas lazily; its item must equal the SDK's, update by update."""
    from chatkit.server import ChatKitServer
    from chatkit.types import (
        AssistantMessageContentPartAdded,
        AssistantMessageContentPartDone,
        ThreadItemAddedEvent,
        ThreadItemUpdatedEvent,
    )

    from flask_chatkit.web.endpoint import _Checkpoints

    class Server(ChatKitServer[Any]):
        async def respond(self, thread: Any, input: Any, context: Any) -> Any:
            raise NotImplementedError  # only the SDK's update helpers are used

    server = Server(store=None)  # type: ignore[arg-type]
    tracker = _Checkpoints(server, CTX)
    reference: dict[str, Any] = {}
    first = reply("")
    events: list[Any] = [ThreadItemAddedEvent(item=first)]
    events += [_delta(0, text) for text in ("a", "b", " c")]
    events.append(
        ThreadItemUpdatedEvent(
            item_id="msg_1",
            update=AssistantMessageContentPartDone(
                content_index=0, content=AssistantMessageContent(text="ab c!")
            ),
        )
    )
    events.append(
        ThreadItemUpdatedEvent(
            item_id="msg_1",
            update=AssistantMessageContentPartAdded(
                content_index=1, content=AssistantMessageContent(text="")
            ),
        )
    )
    events += [_delta(1, text) for text in ("x", "y")]
    events.append(_delta(3, "z"))  # a gap: padded
    for event in events:
        tracker.track(event)
        if isinstance(event, ThreadItemAddedEvent):
            reference[event.item.id] = event.item.model_copy(deep=True)
        else:
            server._update_pending_items(reference, event.model_copy(deep=True))
    assert tracker.changed == {"msg_1"}
    tracker._apply_deltas()
    texts = [part.text for part in tracker.pending["msg_1"].content]
    assert texts == [part.text for part in reference["msg_1"].content] == ["ab c!", "xy", "", "z"]


# -- through the Flask view ---------------------------------------------------------


def stored_items(db: Path, thread_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, type, payload) of a thread's item rows, read on a connection of our own."""
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute(
            "SELECT id, payload FROM chatkit_items WHERE thread_id = ? ORDER BY seq", (thread_id,)
        ).fetchall()
    return [(i, json.loads(p)["type"], json.loads(p)) for i, p in rows]


def reply_done(events: list[dict[str, Any]]) -> bool:
    return any(
        e["type"] == "thread.item.done" and e["item"]["type"] == "assistant_message" for e in events
    )


def text_of(payload: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in payload.get("content", []))


def words(count: int) -> str:
    return "".join(f"w{n} " for n in range(count))


def start_stream(tmp_path: Path, text: str, store: Any = None, **config: Any) -> tuple[Any, Any]:
    db = tmp_path / "ckpt.sqlite3"
    if store is not None:
        store = store(f"sqlite:///{db}")
    app = create_test_app(
        store=store,
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{db}",
        **config,
    )
    client = login_as(app, "ada").client
    response = client.post("/chatkit", json=create_request(text), buffered=False)
    assert response.status_code == 200
    return response, iter(response.response)


def test_a_streaming_reply_is_checkpointed_under_the_id_the_client_saw(tmp_path: Path) -> None:
    db = tmp_path / "ckpt.sqlite3"
    response, chunks = start_stream(tmp_path, "words=40 delay=0.05", CHATKIT_CHECKPOINT_SECONDS=0.3)
    events: list[dict[str, Any]] = []
    seen: list[tuple[float, str]] = []  # (when, stored text) each time the stored text changed
    started = time.monotonic()
    for chunk in chunks:
        events += sse_data(chunk)
        added = [
            e
            for e in events
            if e["type"] == "thread.item.added" and e["item"]["type"] == "assistant_message"
        ]
        thread_id = created_thread_id(events)
        if added and not reply_done(events):
            rows = [r for r in stored_items(db, thread_id) if r[1] == "assistant_message"]
            # The reader lags behind the stream: the final row may already be there.
            if rows and rows[0][2].get(CHECKPOINT_FLAG):
                # Mid-stream: the partial text, under the id of thread.item.added.
                assert [r[0] for r in rows] == [added[0]["item"]["id"]]
                if not seen or seen[-1][1] != text_of(rows[0][2]):
                    seen.append((time.monotonic() - started, text_of(rows[0][2])))
    response.close()
    full = words(40)
    # Several checkpoints, each a prefix of the reply, none the whole of it; about one
    # per 0.3 s over a 2 s reply (per event would be 40).
    assert 3 <= len(seen) <= 10, seen
    assert all(full.startswith(text) and 0 < len(text) < len(full) for _, text in seen), seen
    # The final item replaced the checkpoint: one row, the full text, no flag.
    rows = stored_items(db, thread_id)
    assert [r[1] for r in rows] == ["user_message", "assistant_message"]
    assert rows[1][0] == added[0]["item"]["id"]
    assert text_of(rows[1][2]) == full and CHECKPOINT_FLAG not in rows[1][2]


def test_checkpoints_off_write_nothing_mid_stream(tmp_path: Path) -> None:
    db = tmp_path / "ckpt.sqlite3"
    response, chunks = start_stream(tmp_path, "words=20 delay=0.05", CHATKIT_CHECKPOINT_SECONDS=0)
    mid_stream: list[str] = []  # texts of assistant rows seen while the reply streamed
    reads = 0
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        events += sse_data(chunk)
        thread_id = thread_id_of(events)
        if thread_id and not reply_done(events):
            reads += 1
            rows = stored_items(db, thread_id)
            mid_stream += [text_of(r[2]) for r in rows if r[1] == "assistant_message"]
    response.close()
    # Only ever the final row (the reader lags behind the stream), never a partial one.
    assert reads >= 10 and set(mid_stream) <= {words(20)}, mid_stream


class FailingCheckpoints(SQLAlchemyStore):
    """The database goes away once a reply has been checkpointed twice."""

    checkpoints = 0

    async def save_checkpoints(self, rows: Any) -> None:
        self.checkpoints += 1
        if self.checkpoints > 2:
            raise sa_exc.OperationalError("INSERT", {}, ConnectionError("server closed"))
        await super().save_checkpoints(rows)


def test_a_failing_checkpoint_ends_the_stream_with_an_error(tmp_path: Path) -> None:
    # 200 words 0.05 s apart would stream for 10 s; checkpoints every 0.2 s.
    response, chunks = start_stream(
        tmp_path, "words=200 delay=0.05", store=FailingCheckpoints, CHATKIT_CHECKPOINT_SECONDS=0.2
    )
    started = time.monotonic()
    events = [e for chunk in chunks for e in sse_data(chunk)]
    took = time.monotonic() - started
    response.close()
    # The third checkpoint (~0.6 s) fails: the stream ends then, with an error event.
    assert took < 2.5, took  # 4x the ~0.6 s it takes
    assert events[-1]["type"] == "error", events[-3:]
    deltas = [e for e in events if e["type"] == "thread.item.updated"]
    assert 5 <= len(deltas) < 40, len(deltas)
    assert not reply_done(events)


def test_a_cancelled_reply_that_opened_a_content_part_is_kept_once(tmp_path: Path) -> None:
    """The SDK keeps a ``content_part.added``'s content object in its own copy of the
    item; the checkpoint's copy must not share it, or each later delta lands twice in
    what the SDK saves when the reply is cancelled."""
    db = tmp_path / "ckpt.sqlite3"
    response, chunks = start_stream(
        tmp_path, "words=60 delay=0.03 part=1", CHATKIT_CHECKPOINT_SECONDS=0.1
    )
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        events += sse_data(chunk)
        if sum(e["type"] == "thread.item.updated" for e in events) >= 15:
            break  # past a few checkpoints, mid-reply
    response.close()  # the client leaves: ChatKit saves the partial reply
    thread_id = created_thread_id(events)
    rows = [r for r in stored_items(db, thread_id) if r[1] == "assistant_message"]
    assert len(rows) == 1
    kept = text_of(rows[0][2])
    assert kept and words(60).startswith(kept), kept  # each word once, in order
