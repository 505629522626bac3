"""Thread titles are bounded, and so are pages of threads (issue 17, finding 1).

Before: 100 threads retitled with 3.9 M characters each (200 every time) made one
``threads.list`` 390 MB and the worker grew from 131 to 1,365 MiB.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from flask_chatkit.storage.sql import SQLAlchemyStore

from .apps import create_test_app
from .helpers import created_thread_id, login_as, sse_data
from .http_client import create_request
from .test_store import ALICE, T0, run, thread

KIB = 1024
MAX_TITLE_CHARS = 1000  # DESIGN.md: a longer title is a 400


@pytest.fixture
def sql_client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_test_app(
        store=None,
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'titles.sqlite3'}",
    )
    yield login_as(app, "alice").client


def new_thread(client: FlaskClient) -> str:
    response = client.post("/chatkit", json=create_request("hello"))
    assert response.status_code == 200
    return created_thread_id(sse_data(response.get_data()))


def retitle(client: FlaskClient, thread_id: str, title: str) -> tuple[int, dict[str, object]]:
    response = client.post(
        "/chatkit",
        json={"type": "threads.update", "params": {"thread_id": thread_id, "title": title}},
    )
    return response.status_code, response.get_json()


def stored_title(client: FlaskClient, thread_id: str) -> object:
    response = client.post(
        "/chatkit", json={"type": "threads.get_by_id", "params": {"thread_id": thread_id}}
    )
    assert response.status_code == 200
    return response.get_json()["title"]


def test_a_title_over_1000_characters_is_400_and_changes_nothing(sql_client: FlaskClient) -> None:
    thread_id = new_thread(sql_client)
    status, _ = retitle(sql_client, thread_id, "t" * MAX_TITLE_CHARS)
    assert status == 200
    assert stored_title(sql_client, thread_id) == "t" * MAX_TITLE_CHARS

    for size in (MAX_TITLE_CHARS + 1, 3_900_000):
        status, body = retitle(sql_client, thread_id, "x" * size)
        assert status == 400
        assert body["error"]["code"] == "invalid_request"  # type: ignore[index]
        assert "title" in body["error"]["message"]  # type: ignore[index]
        assert stored_title(sql_client, thread_id) == "t" * MAX_TITLE_CHARS


def payload_bytes(thread_json: str) -> int:
    return len(thread_json.encode())


def test_thread_pages_are_bounded_by_bytes(store_url: str) -> None:
    """100 threads with 1,000-character titles and three megabyte titles written
    straight through the store (a server may set any title): every page holds at
    most the byte budget before its last thread, and paging sees each thread once."""
    budget = 32 * KIB
    store = SQLAlchemyStore(store_url, max_page_bytes=budget)
    try:
        store.create_all()
        expected = []
        for n in range(100):
            huge = n in (10, 50, 51)
            title = ("H" if huge else "t") * (1024 * KIB if huge else MAX_TITLE_CHARS)
            thread_id = f"thr_{n:03d}"
            run(store.save_thread(thread(thread_id, T0 + timedelta(seconds=n), title=title), ALICE))
            expected.append(thread_id)

        seen: list[str] = []
        page_sizes: list[int] = []
        after = None
        for _ in range(200):  # bounded: at least one thread per page
            page = run(store.load_threads(100, after, "asc", ALICE))
            sizes = [payload_bytes(t.model_dump_json()) for t in page.data]
            # The first thread always comes (paging advances); the rest only
            # while the threads before them stay under the budget.
            assert sum(sizes[:-1]) < budget, (len(sizes), sum(sizes))
            seen += [t.id for t in page.data]
            page_sizes.append(len(page.data))
            if not page.has_more:
                break
            assert page.after == page.data[-1].id
            after = page.after
        assert seen == expected
        # ~1 KiB per small thread: a 32 KiB page holds about 30 of them, not 100.
        assert max(page_sizes) < 40, page_sizes
        assert len(page_sizes) > 3
    finally:
        store.close()
        store.engine.dispose()
