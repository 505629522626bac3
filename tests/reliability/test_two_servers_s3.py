"""Two machines, one truth: two gunicorn servers share one PostgreSQL and one bucket.

Each server has an instance folder, attachments directory and TMPDIR of its own
(as if on two machines). An attachment uploaded through A is sent in a message
through B, previewed through A, deleted through B, and every step is visible on
both; afterwards nothing was written to either local disk. Meanwhile a stream
on A keeps flowing while B lists and deletes other threads.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import requests

from tests.gunicorn import RunningServer
from tests.s3 import S3Server

from .conftest import (
    create_thread,
    list_items,
    list_threads,
    login,
    post,
    serve,
    sse_events,
    stream,
    thread_id_of,
    user_input,
)


def machine(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    (root / "tmp").mkdir(parents=True)
    return root


def local_files(root: Path) -> list[str]:
    """Every file under a machine's folders except gunicorn's own log."""
    found = []
    for folder, _dirs, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names if not n.startswith("gunicorn-")]
    return found


@pytest.mark.timeout(240)
def test_upload_on_a_send_on_b_preview_on_a_delete_on_b(
    tmp_path: Path, shared_pg_url: str, s3_server: S3Server, s3_bucket: str
) -> None:
    roots = {name: machine(tmp_path, name) for name in ("a", "b")}

    def on(name: str) -> AbstractContextManager[RunningServer]:
        root = roots[name]
        return serve(root, database_url=shared_pg_url, env={
            **s3_server.env,
            "CHATKIT_ATTACHMENTS_URL": f"s3://{s3_bucket}/shared",
            "CHATKIT_TEST_INSTANCE_PATH": str(root / "instance"),
            "TMPDIR": str(root / "tmp"),
        })

    with on("a") as a, on("b") as b:
        ada = login(a.url, "ada")
        png = b"\x89PNG\r\n\x1a\n" + os.urandom(3 * 1024 * 1024)

        # Upload through A (direct upload: the bytes stream through A to the bucket) ...
        uploaded = ada.post(f"{a.url}/chatkit/attachments",
                            files={"file": ("pic.png", png, "image/png")}, timeout=60)
        assert uploaded.status_code == 200, uploaded.text
        direct_id = uploaded.json()["id"]
        # ... and two-phase, straight to the bucket with A's presigned URL.
        created = post(ada, a.url, {"type": "attachments.create", "params": {
            "name": "two.png", "size": len(png), "mime_type": "image/png"}})
        assert created.status_code == 200, created.text
        descriptor = created.json()["upload_descriptor"]
        put = requests.put(descriptor["url"], data=png, headers=descriptor["headers"], timeout=60)
        assert put.status_code == 200
        presigned_id = created.json()["id"]

        # Send the message through B.
        events = stream(ada, b.url, {"type": "threads.create", "params": {
            "input": user_input("words=2", [direct_id, presigned_id])}})
        thread_id = thread_id_of(events)
        assert thread_id

        # Preview through A: owner-checked there, then the bucket.
        for attachment_id in (direct_id, presigned_id):
            preview = ada.get(f"{a.url}/chatkit/attachments/{attachment_id}/content",
                              allow_redirects=False, timeout=10)
            assert preview.status_code == 302
            assert requests.get(preview.headers["Location"], timeout=30).content == png
        bob = login(b.url, "bob")
        for server in (a, b):
            foreign = bob.get(f"{server.url}/chatkit/attachments/{direct_id}/content",
                              allow_redirects=False, timeout=10)
            assert foreign.status_code == 404
        # Listed on both, with the same attachments.
        for server in (a, b):
            items = list_items(ada, server.url, thread_id)
            assert [x["id"] for x in items[0]["attachments"]] == [direct_id, presigned_id]
            assert thread_id in {t["id"] for t in list_threads(ada, server.url)}
            preview_url = items[0]["attachments"][0]["preview_url"]
            assert preview_url == f"{server.url}/chatkit/attachments/{direct_id}/content"
        assert sorted(s3_server.keys(s3_bucket)) == sorted(
            [f"shared/{direct_id}", f"shared/{presigned_id}"])

        # Delete through B: the rows and the objects go, on both servers.
        deleted = post(ada, b.url, {"type": "threads.delete", "params": {"thread_id": thread_id}})
        assert deleted.status_code == 200, deleted.text
        for server in (a, b):
            gone = post(ada, server.url, {"type": "threads.get_by_id",
                                          "params": {"thread_id": thread_id}})
            assert gone.status_code == 404
            assert ada.get(f"{server.url}/chatkit/attachments/{direct_id}/content",
                           allow_redirects=False, timeout=10).status_code == 404
        assert s3_server.keys(s3_bucket) == []

        # A stream on A flows while B lists and deletes other threads.
        others = [create_thread(ada, b.url, "words=1")[0] for _ in range(6)]
        churn_errors: list[str] = []

        def churn() -> None:
            for other in others:
                for response in (
                    post(ada, b.url, {"type": "threads.list", "params": {"limit": 50}}),
                    post(ada, b.url, {"type": "threads.delete",
                                      "params": {"thread_id": other}}),
                ):
                    if response.status_code != 200:
                        churn_errors.append(response.text)

        worker = threading.Thread(target=churn)
        flowing = ada.post(f"{a.url}/chatkit", json={"type": "threads.create", "params": {
            "input": user_input("words=40 delay=0.02")}}, stream=True, timeout=60)
        worker.start()
        streamed = sse_events(flowing.content)
        worker.join(timeout=60)
        assert not churn_errors
        deltas = [e for e in streamed if e.get("type") == "thread.item.updated"]
        assert len(deltas) == 40
        remaining = {t["id"] for t in list_threads(ada, a.url)}
        assert not remaining & set(others) and len(remaining) == 1

        for log in (a.log(), b.log()):
            assert "Traceback" not in log
    for name, root in roots.items():
        assert local_files(root) == [], f"server {name} wrote to its local disk"
