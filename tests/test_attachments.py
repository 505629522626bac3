"""Attachments: two-phase and direct upload, content, ownership, limits, deletion.

Unit tests use the Flask test client; the ``TestUnderGunicorn`` class runs the
same flows over real HTTP against ``gunicorn -k gevent`` with the SQL store.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from chatkit.store import NotFoundError
from chatkit.types import FileAttachment, ImageAttachment, ThreadItemDoneEvent, UserMessageItem
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.attachments import FileAttachmentStore, mime_allowed, safe_name
from flask_chatkit.storage.disk import AttachmentTooLarge, DiskStorage
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from .apps import create_test_app
from .gunicorn import RunningServer, start_gunicorn
from .memory_store import MemoryStore

LIMIT = 2000
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "files"


@pytest.fixture
def app(store: MemoryStore, tmp_path: Path, files_dir: Path) -> Flask:
    return create_test_app(
        store=store,
        instance_path=str(tmp_path / "instance"),
        CHATKIT_ATTACHMENTS_DIR=str(files_dir),
        CHATKIT_MAX_ATTACHMENT_BYTES=LIMIT,
    )


def stored(files_dir: Path) -> list[str]:
    """Every entry in the attachments directory (temp files included)."""
    return sorted(os.listdir(files_dir)) if files_dir.exists() else []


def create(
    ck: ChatKitClient, name: str = "notes.txt", size: int = 5, mime: str = "text/plain"
) -> Any:
    return ck.send(
        {
            "type": "attachments.create",
            "params": {"name": name, "size": size, "mime_type": mime},
        }
    )


def path_of(url: Any) -> str:
    return urlsplit(str(url)).path


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] == code


def upload_raw(client: FlaskClient, attachment: Any, data: bytes, method: str = "POST") -> Any:
    return client.open(
        path_of(attachment.upload_descriptor.url),
        method=method,
        data=data,
        content_type="application/octet-stream",
    )


def upload_multipart(client: FlaskClient, url: str, data: bytes, name: str, mime: str) -> Any:
    return client.post(
        url,
        data={"file": (io.BytesIO(data), name, mime)},
        content_type="multipart/form-data",
    )


# -- two-phase ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["raw-post", "raw-put", "multipart"])
def test_two_phase_upload_then_content(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path, how: str
) -> None:
    attachment = create(alice, name="notes.txt", size=11)
    assert isinstance(attachment, FileAttachment)
    assert attachment.id.startswith("atc_") and len(attachment.id) == 36
    descriptor = attachment.upload_descriptor
    assert descriptor is not None and descriptor.method == "POST"
    assert str(descriptor.url) == f"http://localhost/chatkit/attachments/{attachment.id}/upload"
    assert stored(files_dir) == []

    # Not uploaded yet: no content.
    assert_error(client.get(f"/chatkit/attachments/{attachment.id}/content"), 404, "not_found")

    if how == "multipart":
        response = upload_multipart(
            client, path_of(descriptor.url), b"hello world", "x.txt", "text/plain"
        )
    else:
        response = upload_raw(
            client, attachment, b"hello world", "PUT" if how == "raw-put" else "POST"
        )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["id"] == attachment.id and "upload_descriptor" not in body
    assert "metadata" not in body
    assert stored(files_dir) == [attachment.id]
    assert (files_dir / attachment.id).read_bytes() == b"hello world"

    response = client.get(f"/chatkit/attachments/{attachment.id}/content")
    assert response.status_code == 200
    assert response.data == b"hello world"
    assert response.mimetype == "text/plain"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"].startswith("private")
    assert "public" not in response.headers["Cache-Control"]
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert "notes.txt" in response.headers["Content-Disposition"]
    assert "sandbox" in response.headers["Content-Security-Policy"]


def test_create_response_has_no_metadata_and_no_user_path(
    client: FlaskClient, alice: ChatKitClient
) -> None:
    response = client.post(
        "/chatkit",
        data=json.dumps(
            {
                "type": "attachments.create",
                "params": {"name": "../../evil.txt", "size": 3, "mime_type": "text/plain"},
            }
        ),
        content_type="application/json",
    )
    assert response.status_code == 200
    body = response.get_json()
    assert "metadata" not in body
    assert body["name"] == "evil.txt"


def test_second_upload_is_a_conflict(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path
) -> None:
    attachment = create(alice, size=3)
    assert upload_raw(client, attachment, b"abc").status_code == 200
    assert_error(upload_raw(client, attachment, b"xyz"), 409, "conflict")
    assert (files_dir / attachment.id).read_bytes() == b"abc"


def test_size_mismatch_is_400_and_leaves_no_file(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path
) -> None:
    attachment = create(alice, size=10)
    assert_error(upload_raw(client, attachment, b"short"), 400, "bad_request")
    assert stored(files_dir) == []
    url = path_of(attachment.upload_descriptor.url)
    # Multipart: the length is only known after streaming; the file is removed.
    assert_error(
        upload_multipart(client, url, b"x" * 11, "a.txt", "text/plain"), 400, "bad_request"
    )
    assert stored(files_dir) == []
    # Still pending: a correct upload then succeeds.
    assert upload_raw(client, attachment, b"0123456789").status_code == 200
    assert stored(files_dir) == [attachment.id]


def test_pending_upload_over_limit_is_413_and_leaves_no_file(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path
) -> None:
    attachment = create(alice, size=LIMIT)
    assert_error(upload_raw(client, attachment, b"x" * (LIMIT + 1)), 413, "payload_too_large")
    url = path_of(attachment.upload_descriptor.url)
    big = b"x" * (LIMIT * 20)
    assert_error(
        upload_multipart(client, url, big, "a.txt", "text/plain"), 413, "payload_too_large"
    )
    # Within the multipart allowance but over the limit: caught while streaming.
    response = upload_multipart(client, url, b"x" * (LIMIT + 1), "a.txt", "text/plain")
    assert_error(response, 413, "payload_too_large")
    assert stored(files_dir) == []


def test_create_checks_declared_size_and_mime(alice: ChatKitClient) -> None:
    with pytest.raises(ChatKitHTTPError) as err:
        create(alice, size=LIMIT + 1)
    assert err.value.status == 413
    with pytest.raises(ChatKitHTTPError) as err:
        create(alice, name="a.html", mime="text/html")
    assert err.value.status == 415 and err.value.code == "unsupported_media_type"
    with pytest.raises(ChatKitHTTPError) as err:
        create(alice, size=-1)
    assert err.value.status == 400
    assert isinstance(create(alice, size=LIMIT), FileAttachment)


def test_mime_patterns() -> None:
    assert mime_allowed("image/png", ["image/*"])
    assert mime_allowed("IMAGE/PNG; charset=x", ["image/png"])
    assert not mime_allowed("text/html", ["image/*", "text/plain"])
    assert not mime_allowed("image", ["image/*"])
    assert not mime_allowed("image/png\r\nX: y", ["image/*"])
    assert mime_allowed("application/pdf", ["*/*"])


def test_mime_pattern_config(tmp_path: Path, files_dir: Path) -> None:
    app = create_test_app(
        store=MemoryStore(),
        instance_path=str(tmp_path / "i"),
        CHATKIT_ATTACHMENTS_DIR=str(files_dir),
        CHATKIT_ALLOWED_MIME_TYPES=["image/*"],
    )
    client = app.test_client()
    client.post("/login/carol")
    ck = ChatKitClient(client)
    assert isinstance(create(ck, name="a.bmp", mime="image/bmp"), ImageAttachment)
    with pytest.raises(ChatKitHTTPError) as err:
        create(ck)  # text/plain is no longer allowed
    assert err.value.status == 415


def test_routes_follow_url_prefix(tmp_path: Path, files_dir: Path) -> None:
    app = create_test_app(
        store=MemoryStore(),
        instance_path=str(tmp_path / "i"),
        CHATKIT_ATTACHMENTS_DIR=str(files_dir),
        CHATKIT_URL_PREFIX="/api/ck",
    )
    client = app.test_client()
    client.post("/login/carol")
    attachment = create(ChatKitClient(client, path="/api/ck"), size=2)
    url = str(attachment.upload_descriptor.url)
    assert url == f"http://localhost/api/ck/attachments/{attachment.id}/upload"
    assert client.post(url, data=b"ok").status_code == 200
    assert client.get(f"/api/ck/attachments/{attachment.id}/content").data == b"ok"


def test_unknown_attachment_is_404(client: FlaskClient, alice: ChatKitClient) -> None:
    assert_error(client.post("/chatkit/attachments/atc_nope/upload", data=b"x"), 404, "not_found")
    assert_error(client.get("/chatkit/attachments/atc_nope/content"), 404, "not_found")


# -- direct -------------------------------------------------------------------


def test_direct_upload(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path, store: MemoryStore
) -> None:
    response = upload_multipart(
        client, "/chatkit/attachments", b"%PDF-1.4 doc", "report.pdf", "application/pdf"
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["type"] == "file" and body["name"] == "report.pdf"
    assert body["mime_type"] == "application/pdf"
    assert "upload_descriptor" not in body and "metadata" not in body
    assert stored(files_dir) == [body["id"]]
    owner, row = store.attachments[body["id"]]
    assert owner == "alice" and row.metadata == {"size": 12, "uploaded": True}
    content = client.get(f"/chatkit/attachments/{body['id']}/content")
    assert content.data == b"%PDF-1.4 doc" and content.mimetype == "application/pdf"


def test_direct_upload_refuses_bad_type_size_and_shape(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path, store: MemoryStore
) -> None:
    response = upload_multipart(client, "/chatkit/attachments", b"<script>", "x.html", "text/html")
    assert_error(response, 415, "unsupported_media_type")
    response = upload_multipart(
        client, "/chatkit/attachments", b"x" * (LIMIT + 1), "a.txt", "text/plain"
    )
    assert_error(response, 413, "payload_too_large")
    response = client.post("/chatkit/attachments", data=b"raw", content_type="text/plain")
    assert_error(response, 415, "unsupported_media_type")
    response = client.post(
        "/chatkit/attachments", data={"other": "x"}, content_type="multipart/form-data"
    )
    assert_error(response, 400, "bad_request")
    assert stored(files_dir) == [] and store.attachments == {}


def test_image_gets_preview_url_that_serves(client: FlaskClient, alice: ChatKitClient) -> None:
    attachment = create(alice, name="cat.png", size=len(PNG), mime="image/png")
    assert isinstance(attachment, ImageAttachment)
    assert (
        str(attachment.preview_url)
        == f"http://localhost/chatkit/attachments/{attachment.id}/content"
    )
    assert upload_raw(client, attachment, PNG).status_code == 200
    response = client.get(path_of(attachment.preview_url))
    assert response.status_code == 200 and response.data == PNG
    assert response.mimetype == "image/png"
    assert response.headers["Content-Disposition"].startswith("inline")

    direct = upload_multipart(
        client, "/chatkit/attachments", PNG, "dog.png", "image/png"
    ).get_json()
    assert direct["type"] == "image"
    assert client.get(path_of(direct["preview_url"])).data == PNG


# -- ownership, auth, methods ---------------------------------------------------


def test_another_user_gets_404_everywhere(
    app: Flask, client: FlaskClient, alice: ChatKitClient, bob: ChatKitClient, files_dir: Path
) -> None:
    pending = create(alice, size=3)
    done = create(alice, size=3)
    assert upload_raw(client, done, b"abc").status_code == 200

    assert_error(upload_raw(bob.client, pending, b"abc"), 404, "not_found")
    assert_error(bob.client.get(f"/chatkit/attachments/{done.id}/content"), 404, "not_found")
    with pytest.raises(ChatKitHTTPError) as err:
        bob.send({"type": "attachments.delete", "params": {"attachment_id": done.id}})
    assert err.value.status == 404
    with pytest.raises(ChatKitHTTPError) as err:
        bob.create_thread("hi", attachments=[done.id])
    assert err.value.status == 404

    assert (files_dir / done.id).read_bytes() == b"abc"
    assert client.get(f"/chatkit/attachments/{done.id}/content").data == b"abc"
    assert upload_raw(client, pending, b"xyz").status_code == 200


def test_store_delete_refuses_foreign_id_on_its_own(tmp_path: Path) -> None:
    asyncio.run(_store_delete_refuses_foreign_id(tmp_path))


async def _store_delete_refuses_foreign_id(tmp_path: Path) -> None:
    store = MemoryStore()
    storage = DiskStorage(tmp_path)
    files = FileAttachmentStore(
        storage, store=store, max_bytes=10, allowed_mime_types=["text/plain"]
    )
    alice, bob = type("C", (), {"user_id": "alice"})(), type("C", (), {"user_id": "bob"})()
    attachment = FileAttachment(id="atc_x", name="a", mime_type="text/plain")
    await store.save_attachment(attachment, alice)
    storage.save("atc_x", [b"abc"], 10)
    with pytest.raises(NotFoundError):
        await files.delete_attachment("atc_x", bob)
    assert storage.exists("atc_x")
    await files.delete_attachment("atc_x", alice)
    assert not storage.exists("atc_x")


def test_login_required(app: Flask) -> None:
    anon = app.test_client()
    assert_error(anon.post("/chatkit/attachments", data={}), 401, "unauthorized")
    assert_error(anon.post("/chatkit/attachments/atc_x/upload", data=b"x"), 401, "unauthorized")
    assert_error(anon.get("/chatkit/attachments/atc_x/content"), 401, "unauthorized")


def test_wrong_method_is_json_405_with_allow(client: FlaskClient, alice: ChatKitClient) -> None:
    for method, url, allow in [
        ("GET", "/chatkit/attachments", "POST"),
        ("GET", "/chatkit/attachments/atc_x/upload", "PUT"),
        ("DELETE", "/chatkit/attachments/atc_x/content", "GET"),
    ]:
        response = client.open(url, method=method)
        assert_error(response, 405, "method_not_allowed")
        assert allow in response.headers["Allow"]


# -- deletion -------------------------------------------------------------------


def test_delete_removes_file_and_row(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path, store: MemoryStore
) -> None:
    attachment = create(alice, size=3)
    assert upload_raw(client, attachment, b"abc").status_code == 200
    assert (
        alice.send({"type": "attachments.delete", "params": {"attachment_id": attachment.id}}) == {}
    )
    assert stored(files_dir) == [] and attachment.id not in store.attachments
    assert_error(client.get(f"/chatkit/attachments/{attachment.id}/content"), 404, "not_found")
    with pytest.raises(ChatKitHTTPError) as err:
        alice.send({"type": "attachments.delete", "params": {"attachment_id": attachment.id}})
    assert err.value.status == 404


# -- path traversal -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../x", "..", ".", "a/b", "", "x" * 129, ".upload-1.part", "a\x00b", "é"]
)
def test_disk_storage_rejects_unsafe_ids(tmp_path: Path, bad: str) -> None:
    storage = DiskStorage(tmp_path / "files")
    (tmp_path / "x").write_bytes(b"outside")
    with pytest.raises(ValueError):
        storage.save(bad, [b"data"], 100)
    with pytest.raises(ValueError):
        storage.open(bad)
    with pytest.raises(ValueError):
        storage.delete(bad)
    assert (tmp_path / "x").read_bytes() == b"outside"
    assert stored(tmp_path / "files") == []


@pytest.mark.parametrize(
    "bad", ["..", "%2E%2E", "..%2Fsecret", "%2E%2E%2F%2E%2E%2Fsecret", ".secret"]
)
def test_route_ids_cannot_escape(
    client: FlaskClient, alice: ChatKitClient, files_dir: Path, tmp_path: Path, bad: str
) -> None:
    (tmp_path / "secret").write_bytes(b"top secret")
    files_dir.mkdir()
    (files_dir / ".secret").write_bytes(b"hidden")
    for response in (
        client.get(f"/chatkit/attachments/{bad}/content"),
        client.post(f"/chatkit/attachments/{bad}/upload", data=b"overwrite"),
    ):
        assert response.status_code == 404
        assert b"top secret" not in response.data and b"hidden" not in response.data
    assert (tmp_path / "secret").read_bytes() == b"top secret"
    assert (files_dir / ".secret").read_bytes() == b"hidden"


def test_disk_storage_failure_leaves_nothing(tmp_path: Path) -> None:
    storage = DiskStorage(tmp_path)

    def boom() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("client went away")

    with pytest.raises(OSError):
        storage.save("atc_a", boom(), 100)
    with pytest.raises(AttachmentTooLarge):
        storage.save("atc_b", [b"x" * 60, b"x" * 60], 100)
    assert stored(tmp_path) == []
    assert storage.save("atc_c", [b"x" * 50, b"x" * 50], 100) == 100


def test_safe_name() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("a\r\nSet-Cookie: x.txt") == "aSet-Cookie: x.txt"
    assert safe_name("C:\\temp\\..") == "attachment"
    assert safe_name(None) == "attachment"


# -- chat -----------------------------------------------------------------------


def test_uploaded_attachment_reaches_respond(client: FlaskClient, alice: ChatKitClient) -> None:
    attachment = create(alice, size=3)
    assert upload_raw(client, attachment, b"abc").status_code == 200
    events = alice.create_thread("look words=1", attachments=[attachment.id])
    observed = client.get("/_test/observations").get_json()["observations"]
    assert observed[-1]["attachments"] == [attachment.id]
    user_items = [
        e.item
        for e in events
        if isinstance(e, ThreadItemDoneEvent) and isinstance(e.item, UserMessageItem)
    ]
    assert [a.id for a in user_items[0].attachments] == [attachment.id]
    # Neither the stream nor items.list leaks the integration metadata.
    thread_id = user_items[0].thread_id
    raw = client.post(
        "/chatkit",
        data=json.dumps({"type": "items.list", "params": {"thread_id": thread_id}}),
        content_type="application/json",
    )
    assert attachment.id in raw.get_data(as_text=True)
    assert '"metadata"' not in raw.get_data(as_text=True)
    stream = client.post(
        "/chatkit",
        data=json.dumps(
            {
                "type": "threads.add_user_message",
                "params": {
                    "thread_id": thread_id,
                    "input": {
                        "content": [{"type": "input_text", "text": "again words=1"}],
                        "attachments": [attachment.id],
                        "inference_options": {},
                    },
                },
            }
        ),
        content_type="application/json",
    )
    assert attachment.id in stream.get_data(as_text=True)
    assert '"uploaded"' not in stream.get_data(as_text=True)


def test_message_with_pending_attachment_is_refused(alice: ChatKitClient) -> None:
    pending = create(alice, size=3)
    with pytest.raises(ChatKitHTTPError) as err:
        alice.create_thread("hi", attachments=[pending.id])
    assert err.value.status == 409
    # Deleting a pending attachment stays allowed.
    assert alice.send({"type": "attachments.delete", "params": {"attachment_id": pending.id}}) == {}


# -- real HTTP under gunicorn -k gevent -------------------------------------------


@pytest.fixture(scope="module")
def gunicorn_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningServer, Path]]:
    tmp = tmp_path_factory.mktemp("attachments-gunicorn")
    files = tmp / "files"
    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": f"sqlite:///{tmp / 'db.sqlite3'}",
        "CHATKIT_ATTACHMENTS_DIR": str(files),
        "CHATKIT_MAX_ATTACHMENT_BYTES": str(LIMIT),
    }
    with start_gunicorn(tmp, env=env) as server:
        yield server, files


def session_for(base: str, user: str) -> requests.Session:
    session = requests.Session()
    assert session.post(f"{base}/login/{user}", timeout=10).status_code == 200
    return session


def http_send(session: requests.Session, base: str, payload: dict[str, Any]) -> requests.Response:
    return session.post(f"{base}/chatkit", json=payload, timeout=30)


def http_create(
    session: requests.Session, base: str, size: int, mime: str = "text/plain", name: str = "a.txt"
) -> dict[str, Any]:
    response = http_send(
        session,
        base,
        {"type": "attachments.create", "params": {"name": name, "size": size, "mime_type": mime}},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.integration
class TestUnderGunicorn:
    def test_two_phase_direct_image_and_chat(
        self, gunicorn_server: tuple[RunningServer, Path]
    ) -> None:
        server, files = gunicorn_server
        base = server.url
        alice = session_for(base, "alice")
        data = os.urandom(1500)
        created = http_create(alice, base, len(data), "application/pdf", "r.pdf")
        descriptor = created["upload_descriptor"]
        assert descriptor["url"] == f"{base}/chatkit/attachments/{created['id']}/upload"
        up = alice.request(descriptor["method"], descriptor["url"], data=data, timeout=30)
        assert up.status_code == 200, up.text
        content = alice.get(f"{base}/chatkit/attachments/{created['id']}/content", timeout=30)
        assert content.status_code == 200 and content.content == data
        assert content.headers["X-Content-Type-Options"] == "nosniff"
        assert content.headers["Cache-Control"].startswith("private")

        direct = alice.post(
            f"{base}/chatkit/attachments",
            files={"file": ("cat.png", PNG, "image/png")},
            timeout=30,
        )
        assert direct.status_code == 200, direct.text
        image = direct.json()
        assert image["type"] == "image" and "metadata" not in image
        preview = alice.get(image["preview_url"], timeout=30)
        assert preview.content == PNG and preview.headers["Content-Type"] == "image/png"

        thread = http_send(
            alice,
            base,
            {
                "type": "threads.create",
                "params": {
                    "input": {
                        "content": [{"type": "input_text", "text": "hi words=1"}],
                        "attachments": [created["id"], image["id"]],
                        "inference_options": {},
                    }
                },
            },
        )
        assert thread.status_code == 200 and "text/event-stream" in thread.headers["Content-Type"]
        observed = alice.get(f"{base}/_test/observations", timeout=10).json()["observations"]
        assert observed[-1]["attachments"] == [created["id"], image["id"]]
        assert sorted(os.listdir(files)) == sorted([created["id"], image["id"]])

    def test_ownership_limits_and_delete(self, gunicorn_server: tuple[RunningServer, Path]) -> None:
        server, files = gunicorn_server
        base = server.url
        alice, bob = session_for(base, "alice2"), session_for(base, "bob2")
        before = set(os.listdir(files)) if files.exists() else set()

        created = http_create(alice, base, 3)
        url = created["upload_descriptor"]["url"]
        assert bob.post(url, data=b"abc", timeout=10).status_code == 404
        assert alice.post(url, data=b"abc", timeout=10).status_code == 200
        assert alice.post(url, data=b"abc", timeout=10).status_code == 409
        content_url = f"{base}/chatkit/attachments/{created['id']}/content"
        assert bob.get(content_url, timeout=10).status_code == 404
        foreign = http_send(
            bob, base, {"type": "attachments.delete", "params": {"attachment_id": created["id"]}}
        )
        assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "not_found"

        # Chunked body (no Content-Length): refused while streaming, nothing kept.
        big = http_create(alice, base, LIMIT)

        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b"x" * 1000

        over = alice.post(big["upload_descriptor"]["url"], data=chunks(), timeout=30)
        assert over.status_code == 413 and over.json()["error"]["code"] == "payload_too_large"
        mismatch = alice.put(big["upload_descriptor"]["url"], data=b"x" * 10, timeout=10)
        assert mismatch.status_code == 400
        too_big = http_send(
            alice,
            base,
            {
                "type": "attachments.create",
                "params": {"name": "a", "size": LIMIT + 1, "mime_type": "text/plain"},
            },
        )
        assert too_big.status_code == 413
        bad_type = alice.post(
            f"{base}/chatkit/attachments",
            files={"file": ("x.html", b"<p>", "text/html")},
            timeout=10,
        )
        assert bad_type.status_code == 415
        assert set(os.listdir(files)) - before == {created["id"]}

        deleted = http_send(
            alice, base, {"type": "attachments.delete", "params": {"attachment_id": created["id"]}}
        )
        assert deleted.status_code == 200 and deleted.json() == {}
        assert alice.get(content_url, timeout=10).status_code == 404
        assert set(os.listdir(files)) - before == set()


def test_deleting_or_pruning_threads_removes_their_files(tmp_path: Path, files_dir: Path) -> None:
    """SQL store + disk storage: no orphaned files once their thread is gone."""
    from datetime import datetime, timedelta

    app = create_test_app(
        store=None,  # the default SQLAlchemyStore
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CHATKIT_ATTACHMENTS_DIR=str(files_dir),
    )
    client = app.test_client()
    client.post("/login/alice")
    alice = ChatKitClient(client)
    attached: list[str] = []
    threads: list[str] = []
    for index in range(2):
        attachment = create(alice, size=3)
        assert upload_raw(client, attachment, b"abc").status_code == 200
        events = alice.create_thread(f"file {index} words=1", attachments=[attachment.id])
        threads.append(next(e.thread.id for e in events if e.type == "thread.created"))
        attached.append(attachment.id)
    unrelated = create(alice, size=3)
    assert upload_raw(client, unrelated, b"xyz").status_code == 200
    assert set(stored(files_dir)) == {*attached, unrelated.id}

    assert alice.send({"type": "threads.delete", "params": {"thread_id": threads[0]}}) == {}
    assert set(stored(files_dir)) == {attached[1], unrelated.id}

    store = app.extensions["chatkit"].store
    assert store.prune(datetime.now() + timedelta(days=1)) == [threads[1]]
    assert stored(files_dir) == [unrelated.id]  # never attached to a thread: kept
