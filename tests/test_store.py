"""Conformance suite for SQLAlchemyStore, on SQLite and PostgreSQL (``store_url``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Coroutine
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from chatkit.store import NotFoundError
from chatkit.types import (
    Annotation,
    AssistantMessageContent,
    AssistantMessageItem,
    ClientToolCallItem,
    CustomSummary,
    CustomTask,
    EndOfTurnItem,
    EntitySource,
    FileAttachment,
    FileSource,
    GeneratedImage,
    GeneratedImageItem,
    HiddenContextItem,
    ImageAttachment,
    InferenceOptions,
    LockedStatus,
    SDKHiddenContextItem,
    SearchTask,
    StructuredInputAnswer,
    StructuredInputFreeform,
    StructuredInputItem,
    StructuredInputMultipleChoice,
    StructuredInputMultipleChoiceOption,
    TaskItem,
    ThoughtTask,
    ThreadItem,
    ThreadMetadata,
    ToolChoice,
    URLSource,
    UserMessageItem,
    UserMessageTagContent,
    UserMessageTextContent,
    WidgetItem,
    Workflow,
    WorkflowItem,
)
from chatkit.widgets import Card, Text
from sqlalchemy.exc import DBAPIError

from flask_chatkit.storage.sql import DuplicateIdError, SQLAlchemyStore

T = TypeVar("T")
ALICE = SimpleNamespace(user_id="alice")
BOB = SimpleNamespace(user_id="bob")
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def store(sql_store: SQLAlchemyStore) -> SQLAlchemyStore:
    return sql_store  # on SQLite and PostgreSQL (tests/pg.py), not conftest's MemoryStore


def thread(tid: str, at: datetime = T0, **kw: Any) -> ThreadMetadata:
    return ThreadMetadata(id=tid, created_at=at, **kw)


def message(tid: str, iid: str, at: datetime = T0, text: str = "hi") -> AssistantMessageItem:
    return AssistantMessageItem(
        id=iid, thread_id=tid, created_at=at, content=[AssistantMessageContent(text=text)]
    )


def file_attachment(aid: str = "atc_file", thread_id: str | None = None) -> FileAttachment:
    return FileAttachment(
        id=aid, name="notes.txt", mime_type="text/plain", thread_id=thread_id,
        metadata={"path": "/srv/x/notes.txt", "sha256": "abc", "nested": {"n": [1, 2]}},
    )


def image_attachment(aid: str = "atc_img", thread_id: str | None = None) -> ImageAttachment:
    return ImageAttachment(
        id=aid, name="cat.png", mime_type="image/png", thread_id=thread_id,
        preview_url="https://example.com/cat.png", metadata={"w": 10},
    )


def every_item(tid: str) -> list[ThreadItem]:
    """One item of every ThreadItem subtype (each with non-default fields)."""
    at = T0
    step = timedelta(seconds=1)
    url = URLSource(title="Docs", url="https://example.com/docs", attribution="ex")
    items: list[ThreadItem] = [
        UserMessageItem(
            id="msg_user", thread_id=tid, created_at=at,
            content=[
                UserMessageTextContent(text="hello"),
                UserMessageTagContent(id="tag1", text="@bob", data={"k": 1}, group="people"),
            ],
            attachments=[file_attachment(thread_id=tid), image_attachment(thread_id=tid)],
            quoted_text="quoted",
            inference_options=InferenceOptions(tool_choice=ToolChoice(id="search"), model="m1"),
        ),
        AssistantMessageItem(
            id="msg_asst", thread_id=tid, created_at=at + step,
            content=[AssistantMessageContent(text="answer", annotations=[
                Annotation(source=url, index=3),
                Annotation(source=FileSource(title="F", filename="f.pdf")),
                Annotation(source=EntitySource(title="E", id="ent1", data={"x": "y"})),
            ])],
        ),
        ClientToolCallItem(
            id="tc_1", thread_id=tid, created_at=at + 2 * step, status="completed",
            call_id="call_1", name="get_weather", arguments={"city": "Paris"},
            output={"temp": 21.5},
        ),
        WidgetItem(
            id="wd_1", thread_id=tid, created_at=at + 3 * step,
            widget=Card(children=[Text(value="Hello widget")]), copy_text="Hello widget",
        ),
        GeneratedImageItem(
            id="img_1", thread_id=tid, created_at=at + 4 * step,
            image=GeneratedImage(id="gi1", url="https://example.com/g.png"),
        ),
        StructuredInputItem(
            id="si_1", thread_id=tid, created_at=at + 5 * step, status="answered",
            inputs=[
                StructuredInputMultipleChoice(
                    id="q1", question="Pick", multiple=True,
                    options=[StructuredInputMultipleChoiceOption(value="a")],
                    answer=StructuredInputAnswer(values=["a"]),
                ),
                StructuredInputFreeform(id="q2", question="Why?", description="d"),
            ],
        ),
        WorkflowItem(
            id="wf_1", thread_id=tid, created_at=at + 6 * step,
            workflow=Workflow(
                type="reasoning", expanded=True, summary=CustomSummary(title="Thinking"),
                tasks=[ThoughtTask(content="hmm"), SearchTask(queries=["q"], sources=[url])],
            ),
        ),
        TaskItem(
            id="tsk_1", thread_id=tid, created_at=at + 7 * step,
            task=CustomTask(title="Do", content="done", status_indicator="complete"),
        ),
        HiddenContextItem(
            id="hc_1", thread_id=tid, created_at=at + 8 * step, content={"any": ["json", 1]}
        ),
        SDKHiddenContextItem(id="shcx_1", thread_id=tid, created_at=at + 9 * step, content="c"),
        EndOfTurnItem(id="eot_1", thread_id=tid, created_at=at + 10 * step),
    ]
    return items


@pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")
def test_every_item_type_is_covered() -> None:
    from typing import get_args

    union = get_args(get_args(ThreadItem)[0])
    assert {type(i) for i in every_item("t")} == set(union)


# -- threads ----------------------------------------------------------------
def test_thread_round_trip_and_upsert(store: SQLAlchemyStore) -> None:
    t = thread("thr_1", title="First", status=LockedStatus(reason="r"),
               allowed_image_domains=["a.com"], metadata={"k": [1, {"x": None}]})

    async def go() -> None:
        with pytest.raises(NotFoundError, match="Thread thr_1 not found"):
            await store.load_thread("thr_1", ALICE)
        await store.save_thread(t, ALICE)
        assert await store.load_thread("thr_1", ALICE) == t
        changed = t.model_copy(update={"title": "Renamed"})
        await store.save_thread(changed, ALICE)
        assert await store.load_thread("thr_1", ALICE) == changed
        page = await store.load_threads(10, None, "desc", ALICE)
        assert page.data == [changed]

    run(go())


def test_naive_and_aware_datetimes_round_trip(store: SQLAlchemyStore) -> None:
    naive = datetime(2024, 1, 2, 3, 4, 5, 678901)
    aware = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))

    async def go() -> None:
        await store.save_thread(thread("thr_naive", naive), ALICE)
        await store.save_thread(thread("thr_aware", aware), ALICE)
        await store.add_thread_item("thr_naive", message("thr_naive", "m1", naive), ALICE)
        got = await store.load_thread("thr_naive", ALICE)
        assert got.created_at == naive and got.created_at.tzinfo is None
        got = await store.load_thread("thr_aware", ALICE)
        assert got.created_at == aware and got.created_at.utcoffset() == timedelta(hours=2)
        item = await store.load_item("thr_naive", "m1", ALICE)
        assert item.created_at == naive and item.created_at.tzinfo is None
        # ordering uses the instant: 03:04 +02:00 is 01:04 UTC, before the naive 03:04
        page = await store.load_threads(10, None, "asc", ALICE)
        assert [p.id for p in page.data] == ["thr_aware", "thr_naive"]

    run(go())


def test_threads_pagination_asc_desc(store: SQLAlchemyStore) -> None:
    ids = [f"thr_{n:02d}" for n in range(10)]

    async def walk(order: str, limit: int) -> list[list[str]]:
        pages, after = [], None
        for _ in range(20):
            page = await store.load_threads(limit, after, order, ALICE)
            pages.append([t.id for t in page.data])
            assert page.after == (page.data[-1].id if page.has_more else None)
            if not page.has_more:
                return pages
            after = page.after
        raise AssertionError("pagination never ended")

    async def go() -> None:
        for n, tid in enumerate(ids):
            await store.save_thread(thread(tid, T0 + timedelta(minutes=n)), ALICE)
        assert await walk("asc", 3) == [ids[0:3], ids[3:6], ids[6:9], ids[9:]]
        rev = ids[::-1]
        assert await walk("desc", 4) == [rev[0:4], rev[4:8], rev[8:]]
        assert await walk("asc", 5) == [ids[:5], ids[5:]]  # exact fit: no empty page
        page = await store.load_threads(3, "thr_04", "asc", ALICE)
        assert [t.id for t in page.data] == ids[5:8] and page.has_more
        page = await store.load_threads(3, "thr_04", "desc", ALICE)
        assert [t.id for t in page.data] == ["thr_03", "thr_02", "thr_01"] and page.has_more

    run(go())


def test_unknown_after_cursor_raises(store: SQLAlchemyStore) -> None:
    async def go() -> None:
        await store.save_thread(thread("thr_1"), ALICE)
        await store.add_thread_item("thr_1", message("thr_1", "m1"), ALICE)
        with pytest.raises(NotFoundError):
            await store.load_threads(10, "thr_nope", "asc", ALICE)
        with pytest.raises(NotFoundError):
            await store.load_thread_items("thr_1", "m_nope", 10, "asc", ALICE)
        with pytest.raises(NotFoundError):  # someone else's cursor is unknown too
            await store.load_threads(10, "thr_1", "asc", BOB)
        await store.save_thread(thread("thr_2"), ALICE)  # outside raises: must not fail
        with pytest.raises(NotFoundError):  # an item of another thread is no cursor here
            await store.load_thread_items("thr_2", "m1", 10, "asc", ALICE)

    run(go())


# -- items ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Direct usage of named widget classes")
def test_every_item_type_round_trips(store: SQLAlchemyStore) -> None:
    items = every_item("thr_1")

    async def go() -> None:
        await store.save_thread(thread("thr_1"), ALICE)
        for item in items:
            await store.add_thread_item("thr_1", item, ALICE)
        for item in items:
            loaded = await store.load_item("thr_1", item.id, ALICE)
            assert type(loaded) is type(item)
            assert loaded == item
        page = await store.load_thread_items("thr_1", None, 100, "asc", ALICE)
        assert page.data == items and not page.has_more and page.after is None
        page = await store.load_thread_items("thr_1", None, 100, "desc", ALICE)
        assert page.data == items[::-1]

    run(go())


def test_items_pagination(store: SQLAlchemyStore) -> None:
    async def go() -> None:
        await store.save_thread(thread("thr_1"), ALICE)
        for n in range(7):
            await store.add_thread_item(
                "thr_1", message("thr_1", f"m{n}", T0 + timedelta(seconds=n)), ALICE
            )
        p = await store.load_thread_items("thr_1", None, 3, "asc", ALICE)
        assert [i.id for i in p.data] == ["m0", "m1", "m2"] and p.has_more and p.after == "m2"
        p = await store.load_thread_items("thr_1", p.after, 3, "asc", ALICE)
        assert [i.id for i in p.data] == ["m3", "m4", "m5"] and p.after == "m5"
        p = await store.load_thread_items("thr_1", p.after, 3, "asc", ALICE)
        assert [i.id for i in p.data] == ["m6"] and not p.has_more and p.after is None
        p = await store.load_thread_items("thr_1", None, 4, "desc", ALICE)
        assert [i.id for i in p.data] == ["m6", "m5", "m4", "m3"] and p.after == "m3"
        p = await store.load_thread_items("thr_1", p.after, 4, "desc", ALICE)
        assert [i.id for i in p.data] == ["m2", "m1", "m0"] and p.after is None

    run(go())


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_ties_in_created_at_page_without_skip_or_repeat(
    store: SQLAlchemyStore, order: str
) -> None:
    ids = [f"m{(n * 7) % 25:02d}" for n in range(25)]  # id order is not insertion order

    async def go() -> None:
        await store.save_thread(thread("thr_1"), ALICE)
        for n, iid in enumerate(ids):
            await store.add_thread_item("thr_1", message("thr_1", iid), ALICE)
            await store.save_thread(thread(f"thr_tie_{(n * 7) % 25:02d}"), BOB)
        for owner, load in (
            (ALICE, lambda after: store.load_thread_items("thr_1", after, 7, order, ALICE)),
            (BOB, lambda after: store.load_threads(7, after, order, BOB)),
        ):
            seen: list[str] = []
            after = None
            for _ in range(10):
                page = await load(after)
                assert len(page.data) <= 7
                seen += [x.id for x in page.data]
                if not page.has_more:
                    break
                after = page.after
            expected = ids if owner is ALICE else [f"thr_tie_{i[1:]}" for i in ids]
            assert seen == (expected if order == "asc" else expected[::-1])

    run(go())


def test_add_thread_item_never_overwrites_and_save_item_upserts(store: SQLAlchemyStore) -> None:
    async def go() -> None:
        await store.save_thread(thread("thr_1"), ALICE)
        await store.add_thread_item("thr_1", message("thr_1", "m1", text="original"), ALICE)
        await store.add_thread_item("thr_1", message("thr_1", "m2"), ALICE)
        with pytest.raises(DuplicateIdError):  # an error, not a silent drop
            await store.add_thread_item("thr_1", message("thr_1", "m1", text="dup"), ALICE)
        got = await store.load_item("thr_1", "m1", ALICE)
        assert got == message("thr_1", "m1", text="original")
        page = await store.load_thread_items("thr_1", None, 10, "asc", ALICE)
        assert [i.id for i in page.data] == ["m1", "m2"]
        await store.save_item("thr_1", message("thr_1", "m1", text="edited"), ALICE)
        assert await store.load_item("thr_1", "m1", ALICE) == message("thr_1", "m1", text="edited")
        await store.save_item("thr_1", message("thr_1", "m3"), ALICE)  # insert
        page = await store.load_thread_items("thr_1", None, 10, "asc", ALICE)
        assert [i.id for i in page.data] == ["m1", "m2", "m3"]
        await store.delete_thread_item("thr_1", "m2", ALICE)
        with pytest.raises(NotFoundError):
            await store.load_item("thr_1", "m2", ALICE)
        page = await store.load_thread_items("thr_1", None, 10, "asc", ALICE)
        assert [i.id for i in page.data] == ["m1", "m3"]

    run(go())


# -- attachments ------------------------------------------------------------
def test_attachments_round_trip_upsert_delete(store: SQLAlchemyStore) -> None:
    async def go() -> None:
        for att in (file_attachment(), image_attachment(thread_id="thr_1")):
            with pytest.raises(NotFoundError):
                await store.load_attachment(att.id, ALICE)
            await store.save_attachment(att, ALICE)
            loaded = await store.load_attachment(att.id, ALICE)
            assert type(loaded) is type(att) and loaded == att
            assert loaded.metadata == att.metadata and loaded.metadata
            updated = att.model_copy(update={"thread_id": "thr_9", "metadata": {"v": 2}})
            await store.save_attachment(updated, ALICE)
            assert await store.load_attachment(att.id, ALICE) == updated
            await store.delete_attachment(att.id, ALICE)
            with pytest.raises(NotFoundError):
                await store.load_attachment(att.id, ALICE)

    run(go())


def test_delete_thread_removes_items_and_its_attachments(store: SQLAlchemyStore) -> None:
    async def go() -> None:
        for tid in ("thr_1", "thr_2"):
            await store.save_thread(thread(tid), ALICE)
            await store.add_thread_item(tid, message(tid, f"m_{tid}"), ALICE)
            await store.save_attachment(file_attachment(f"atc_{tid}", thread_id=tid), ALICE)
        await store.save_attachment(file_attachment("atc_loose"), ALICE)
        await store.delete_thread("thr_1", ALICE)
        with pytest.raises(NotFoundError):
            await store.load_thread("thr_1", ALICE)
        assert (await store.load_thread_items("thr_1", None, 10, "asc", ALICE)).data == []
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_thr_1", ALICE)
        await store.load_thread("thr_2", ALICE)
        await store.load_attachment("atc_thr_2", ALICE)
        await store.load_attachment("atc_loose", ALICE)
        assert len((await store.load_thread_items("thr_2", None, 10, "asc", ALICE)).data) == 1

    run(go())
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.items)).scalar() == 1


# -- owner isolation ----------------------------------------------------------
def test_owner_isolation_for_every_method(store: SQLAlchemyStore) -> None:
    mine = thread("thr_a", title="alice's")
    item = message("thr_a", "m_a", text="alice says")
    att = file_attachment("atc_a", thread_id="thr_a")

    async def alice_unchanged() -> None:
        assert await store.load_thread("thr_a", ALICE) == mine
        assert (await store.load_thread_items("thr_a", None, 10, "asc", ALICE)).data == [item]
        assert await store.load_attachment("atc_a", ALICE) == att
        assert (await store.load_threads(10, None, "asc", ALICE)).data == [mine]

    async def go() -> None:
        await store.save_thread(mine, ALICE)
        await store.add_thread_item("thr_a", item, ALICE)
        await store.save_attachment(att, ALICE)

        with pytest.raises(NotFoundError, match="Thread thr_a not found"):
            await store.load_thread("thr_a", BOB)
        page = await store.load_thread_items("thr_a", None, 10, "asc", BOB)
        assert page.data == [] and not page.has_more
        assert (await store.load_threads(10, None, "desc", BOB)).data == []
        with pytest.raises(NotFoundError):
            await store.load_item("thr_a", "m_a", BOB)
        with pytest.raises(NotFoundError):
            await store.load_attachment("atc_a", BOB)
        with pytest.raises(NotFoundError):
            await store.load_thread_items("thr_a", "m_a", 10, "asc", BOB)

        await store.delete_thread_item("thr_a", "m_a", BOB)
        await store.delete_attachment("atc_a", BOB)
        await store.delete_thread("thr_a", BOB)
        await alice_unchanged()

        # writes with the same ids land in bob's own space
        await store.save_thread(thread("thr_a", title="bob's"), BOB)
        await store.add_thread_item("thr_a", message("thr_a", "m_a", text="bob"), BOB)
        await store.save_item("thr_a", message("thr_a", "m_a", text="bob2"), BOB)
        await store.save_attachment(file_attachment("atc_a").model_copy(
            update={"name": "bob.txt"}), BOB)
        await alice_unchanged()
        assert (await store.load_thread("thr_a", BOB)).title == "bob's"
        assert (await store.load_item("thr_a", "m_a", BOB)) == message("thr_a", "m_a", text="bob2")
        assert (await store.load_attachment("atc_a", BOB)).name == "bob.txt"
        await store.delete_thread("thr_a", BOB)
        await alice_unchanged()

    run(go())
    assert [t.id for t, _ in store.iter_owner_threads("bob")] == []
    assert [t.id for t, _ in store.iter_owner_threads("alice")] == ["thr_a"]


def test_custom_owner_callable(store_url: str) -> None:
    store = SQLAlchemyStore(store_url, owner=lambda ctx: ctx["tenant"], table_prefix="x_")
    store.create_all()
    try:
        assert store.threads.name == "x_threads"

        async def go() -> None:
            await store.save_thread(thread("thr_1"), {"tenant": "acme"})
            await store.load_thread("thr_1", {"tenant": "acme"})
            with pytest.raises(NotFoundError):
                await store.load_thread("thr_1", {"tenant": "other"})
            with pytest.raises(ValueError):
                await store.load_thread("thr_1", {"tenant": ""})

        run(go())
    finally:
        store.close()
        store.engine.dispose()


def test_create_all_is_idempotent_and_exposes_metadata(store: SQLAlchemyStore) -> None:
    store.create_all()
    names = set(sa.inspect(store.engine).get_table_names())
    assert {"chatkit_threads", "chatkit_items", "chatkit_attachments"} <= names
    assert set(store.metadata.tables) == {
        "chatkit_threads", "chatkit_items", "chatkit_attachments", "chatkit_schema_version"
    }
    indexes = {
        tuple(ix["column_names"])
        for table in ("chatkit_threads", "chatkit_items")
        for ix in sa.inspect(store.engine).get_indexes(table)
    }
    assert ("owner", "created_at", "seq") in indexes
    assert ("thread_id", "created_at", "seq") in indexes


async def add_20_items_concurrently(store: SQLAlchemyStore) -> None:
    await store.save_thread(thread("thr_1"), ALICE)
    await asyncio.gather(
        *(store.add_thread_item("thr_1", message("thr_1", f"m{n}"), ALICE) for n in range(20))
    )
    assert len((await store.load_thread_items("thr_1", None, 50, "asc", ALICE)).data) == 20


def test_memory_sqlite_works() -> None:
    store = SQLAlchemyStore("sqlite:///:memory:")
    store.create_all()

    run(add_20_items_concurrently(store))
    store.close()


def test_engine_reuse(store_url: str) -> None:
    engine = sa.create_engine(store_url)
    store = SQLAlchemyStore(engine)
    assert store.engine is engine
    store.create_all()

    run(add_20_items_concurrently(store))
    store.close()
    with engine.connect() as conn:  # the caller's engine is still usable
        assert conn.execute(sa.text("SELECT count(*) FROM chatkit_items")).scalar() == 20
    engine.dispose()


# -- concurrency and the event loop ----------------------------------------
def _count_items(store: SQLAlchemyStore, thread_id: str) -> int:
    with store.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(store.items.c.thread_id == thread_id)
        return int(conn.execute(query.select_from(store.items)).scalar_one())


def test_50_os_threads_each_with_its_own_loop(store: SQLAlchemyStore) -> None:
    run(store.save_thread(thread("thr_1"), ALICE))
    errors: list[BaseException] = []
    barrier = threading.Barrier(50, timeout=30)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            run(store.add_thread_item("thr_1", message("thr_1", f"m{n:02d}"), ALICE))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert errors == []
    assert _count_items(store, "thr_1") == 50


def test_50_concurrent_adds_in_one_loop_including_duplicates(store: SQLAlchemyStore) -> None:
    async def go() -> list[Any]:
        await store.save_thread(thread("thr_1"), ALICE)
        return await asyncio.gather(*(
            store.add_thread_item("thr_1", message("thr_1", f"m{n % 50:02d}"), ALICE)
            for n in range(100)  # every id twice: one insert wins, the other is told so
        ), return_exceptions=True)

    results = run(go())
    assert sum(r is None for r in results) == 50
    assert sum(isinstance(r, DuplicateIdError) for r in results) == 50, results
    assert _count_items(store, "thr_1") == 50


def _process_writer(url: str, worker: int, count: int) -> None:
    store = SQLAlchemyStore(url)

    async def go() -> None:
        for n in range(count):
            await store.add_thread_item("thr_mp", message("thr_mp", f"w{worker}-{n}"), ALICE)
            if n % 5 == 0:
                await store.save_thread(thread(f"thr_w{worker}_{n}"), ALICE)
                # an old thread, pruned right away: prune reads, then deletes, in one
                # transaction, racing the other writers
                await store.save_thread(thread(f"thr_old{worker}_{n}", datetime(1990, 1, 1)), BOB)
                store.prune(datetime(2000, 1, 1))

    run(go())
    store.close()
    store.engine.dispose()


def test_sqlite_multi_process_writers(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'mp.sqlite3'}"
    store = SQLAlchemyStore(url)
    store.create_all()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(url, w, 25)) for w in range(4)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120  # one deadline for all, not 120 s each
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:  # a writer still running (hung, or the test failed) is killed
            if p.is_alive():
                p.kill()
                p.join(10)
    assert _count_items(store, "thr_mp") == 100
    assert len(list(store.iter_owner_threads("alice"))) == 20
    assert list(store.iter_owner_threads("bob")) == []
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()
    store.engine.dispose()


_FORKED: dict[str, SQLAlchemyStore] = {}


def _forked_writer(n: int) -> None:
    store = _FORKED["store"]
    run(store.add_thread_item("thr_1", message("thr_1", f"child{n}"), ALICE))


def test_store_keeps_working_after_fork(store: SQLAlchemyStore) -> None:
    """gunicorn forks workers after the app (and its store) may have been used."""
    run(store.save_thread(thread("thr_1"), ALICE))  # parent's worker threads and connections
    _FORKED["store"] = store
    try:
        ctx = multiprocessing.get_context("fork")
        procs: list[Any] = []
        procs = [ctx.Process(target=_forked_writer, args=(n,)) for n in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
    finally:
        _FORKED.clear()
        for p in procs:
            if p.is_alive():  # hung: its store never got worker threads of its own
                p.kill()
                p.join(5)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _count_items(store, "thr_1") == 2
    assert run(store.load_thread("thr_1", ALICE)).id == "thr_1"  # parent still fine


def test_database_calls_never_block_the_loop(store: SQLAlchemyStore) -> None:
    """Every statement sleeps 0.3 s; a 10 ms ticker on the loop must keep ticking."""
    run(store.save_thread(thread("thr_1"), ALICE))

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def slow(*_args: Any) -> None:
        time.sleep(0.3)

    async def go() -> float:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        await store.load_thread("thr_1", ALICE)
        await store.add_thread_item("thr_1", message("thr_1", "m1"), ALICE)
        await store.load_threads(10, None, "asc", ALICE)
        stop.set()
        await task
        assert len(gaps) > 30
        return max(gaps)

    try:
        assert run(go()) < 0.2
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", slow)


# -- PostgreSQL specifics ---------------------------------------------------
def test_postgres_down_surfaces_dbapi_error_then_recovers(private_pg_cluster: Any) -> None:
    store = SQLAlchemyStore(private_pg_cluster.url)
    store.create_all()
    try:
        run(store.save_thread(thread("thr_1"), ALICE))
        private_pg_cluster.stop()
        started = time.monotonic()
        with pytest.raises(DBAPIError):
            run(store.load_thread("thr_1", ALICE))
        assert time.monotonic() - started < 10
        private_pg_cluster.start()
        assert run(store.load_thread("thr_1", ALICE)).id == "thr_1"  # pre-ping reconnects
    finally:
        store.close()
        store.engine.dispose()


def test_postgres_url_without_driver_uses_psycopg(postgres_url: str) -> None:
    store = SQLAlchemyStore(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    assert store.engine.dialect.driver == "psycopg"
    store.engine.dispose()


def test_sqlite_write_transactions_take_the_write_lock_up_front(tmp_path: Any) -> None:
    """BEGIN IMMEDIATE: a writer holds the lock from its first statement (no late
    lock upgrade that fails at once with "database is locked")."""
    import sqlite3

    path = tmp_path / "lock.sqlite3"
    store = SQLAlchemyStore(f"sqlite:///{path}")
    store.create_all()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with store._tx(write=True) as conn:
            conn.execute(sa.select(store.threads.c.id)).all()  # a read first
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        with store._tx() as conn:  # readers do not lock writers out
            conn.execute(sa.select(store.threads.c.id)).all()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        store.close()
        store.engine.dispose()


def test_save_thread_has_persisted_when_it_returns_whoever_calls(store: SQLAlchemyStore) -> None:
    """One contract: no deferral, on a loop or driven with no loop running (the view's reads)."""
    from flask_chatkit.bridge.loop import run_inline

    async def saved_then_failed() -> None:
        await store.save_thread(thread("thr_a"), ALICE)
        raise RuntimeError("the caller failed after the save")

    with pytest.raises(RuntimeError):
        run(saved_then_failed())
    assert run(store.load_thread("thr_a", ALICE)).id == "thr_a"  # kept: it was saved

    # Another connection sees it at once (nothing held in this process).
    t = store.threads
    with store.engine.connect() as conn:
        owners = conn.execute(sa.select(t.c.owner).where(t.c.id == "thr_a")).scalars().all()
    assert owners == ["alice"]

    # Driven without a running loop, the store answers on the calling thread.
    run_inline(store.save_thread(thread("thr_b", title="inline"), ALICE))
    assert run_inline(store.load_thread("thr_b", ALICE)).title == "inline"
    assert run(store.load_thread("thr_b", ALICE)).title == "inline"
    with pytest.raises(NotFoundError):
        run_inline(store.load_thread("thr_b", BOB))
