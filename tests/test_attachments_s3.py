"""Attachments on S3 (``CHATKIT_ATTACHMENTS_URL = s3://bucket/prefix``).

The app runs in the Flask test client with the SQL store; the bucket is served
by a real moto server process over HTTP (``tests/s3.py``), and clients PUT/GET
presigned URLs against it with ``requests`` exactly as a browser would.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.storage.disk import StorageUnavailable
from flask_chatkit.storage.s3 import S3Storage, parse_s3_url
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from . import helpers
from .apps import create_test_app
from .components import unavailable
from .gunicorn import stop_process
from .http_client import user_input
from .s3 import S3Server, start_s3_server

LIMIT = 12 * 1024 * 1024  # above the 8 MiB part size: big uploads go multipart


@pytest.fixture
def s3_app(tmp_path: Path, s3_bucket: str) -> Flask:
    return create_test_app(
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CHATKIT_ATTACHMENTS_URL=f"s3://{s3_bucket}/uploads",
        CHATKIT_ATTACHMENTS_DIR=str(tmp_path / "must-stay-empty"),
        CHATKIT_MAX_ATTACHMENT_BYTES=LIMIT,
        CHATKIT_ALLOWED_MIME_TYPES=["image/png", "text/plain", "application/octet-stream"],
    )


@pytest.fixture
def web(s3_app: Flask) -> FlaskClient:
    client = s3_app.test_client()
    assert client.post("/login/alice").status_code == 200
    return client


@pytest.fixture
def ck(web: FlaskClient) -> ChatKitClient:
    return ChatKitClient(web)


def create(ck: ChatKitClient, size: int, mime: str = "image/png", name: str = "pic.png") -> Any:
    params = {"name": name, "size": size, "mime_type": mime}
    return ck.send({"type": "attachments.create", "params": params})


def put_presigned(attachment: Any, data: bytes, content_type: str | None = None) -> int:
    descriptor = attachment.upload_descriptor
    headers = dict(descriptor.headers)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = requests.request(
        descriptor.method, str(descriptor.url), data=data, headers=headers, timeout=30
    )
    return response.status_code


def send_with(ck: ChatKitClient, attachment_id: str) -> list[Any]:
    return ck.send(
        {"type": "threads.create", "params": {"input": user_input("look", [attachment_id])}}
    )


def no_local_files(tmp_path: Path) -> None:
    assert not (tmp_path / "must-stay-empty").exists()
    assert not (tmp_path / "instance" / "chatkit-attachments").exists()


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b/")
    for bad in ("http://x/y", "s3://", "s3://UPPER/x", "my-bucket"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_presigned_two_phase_upload_preview_and_delete(
    ck: ChatKitClient, web: FlaskClient, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"p" * 100
    attachment = create(ck, len(png))
    descriptor = attachment.upload_descriptor
    assert descriptor.method == "PUT"
    assert str(descriptor.url).startswith(f"{s3_server.endpoint}/{s3_bucket}/uploads/")
    query = urlsplit(str(descriptor.url)).query
    assert "X-Amz-Expires=300" in query and "content-type" in query and "content-length" in query
    assert descriptor.headers == {"Content-Type": "image/png"}
    # preview_url stays our own owner-checked route
    assert str(attachment.preview_url) == (
        f"http://localhost/chatkit/attachments/{attachment.id}/content"
    )

    with pytest.raises(ChatKitHTTPError) as refused:
        send_with(ck, attachment.id)
    assert refused.value.status == 409

    assert put_presigned(attachment, png) == 200
    assert s3_server.keys(s3_bucket) == [f"uploads/{attachment.id}"]
    events = send_with(ck, attachment.id)
    assert any(e.type == "thread.item.done" for e in events)

    response = web.get(f"/chatkit/attachments/{attachment.id}/content")
    assert response.status_code == 302
    assert response.headers["Cache-Control"] == "private, no-store"
    location = response.headers["Location"]
    assert location.startswith(f"{s3_server.endpoint}/{s3_bucket}/uploads/{attachment.id}?")
    fetched = requests.get(location, timeout=10)
    assert fetched.content == png
    assert fetched.headers["Content-Type"] == "image/png"

    # Another user: 404 before any redirect.
    other = web.application.test_client()
    other.post("/login/bob")
    assert other.get(f"/chatkit/attachments/{attachment.id}/content").status_code == 404

    thread_id = next(e.thread.id for e in events if e.type == "thread.created")
    ck.send({"type": "threads.delete", "params": {"thread_id": thread_id}})
    assert s3_server.keys(s3_bucket) == []
    no_local_files(tmp_path)


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"x" * 99, "image/png"), (b"x" * 100, "text/plain")],
    ids=["wrong-size", "wrong-type"],
)
def test_mismatching_object_is_deleted_and_refused(
    ck: ChatKitClient,
    s3_server: S3Server,
    s3_bucket: str,
    data: bytes,
    content_type: str,
) -> None:
    attachment = create(ck, 100)
    # moto does not enforce presigned header conditions; a lax server (or a
    # client with a URL from elsewhere) can store anything: we check at use.
    assert put_presigned(attachment, data, content_type) == 200
    with pytest.raises(ChatKitHTTPError) as refused:
        send_with(ck, attachment.id)
    assert refused.value.status == 409
    assert "discarded" in refused.value.message
    assert s3_server.keys(s3_bucket) == []
    # The right bytes may still be put while the URL is valid.
    assert put_presigned(attachment, b"y" * 100) == 200
    assert any(e.type == "thread.item.done" for e in send_with(ck, attachment.id))


def test_direct_upload_streams_multipart_to_the_bucket(
    web: FlaskClient, ck: ChatKitClient, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    data = bytes(range(256)) * (10 * 1024 * 1024 // 256)  # 10 MiB: two parts
    response = web.post(
        "/chatkit/attachments",
        data={"file": (io.BytesIO(data), "big.bin", "application/octet-stream")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    attachment_id = response.get_json()["id"]
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"uploads/{attachment_id}")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "application/octet-stream"
    assert "-" in head["ETag"]  # a multipart object
    location = web.get(f"/chatkit/attachments/{attachment_id}/content").headers["Location"]
    fetched = requests.get(location, timeout=30)
    assert fetched.content == data
    assert fetched.headers["Content-Disposition"].startswith("attachment")
    no_local_files(tmp_path)


def test_too_large_upload_is_413_and_leaves_nothing(
    web: FlaskClient, ck: ChatKitClient, s3_server: S3Server, s3_bucket: str
) -> None:
    big = b"z" * (LIMIT + 1)
    response = web.post(
        "/chatkit/attachments",
        data={"file": (io.BytesIO(big), "big.txt", "text/plain")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    client = s3_server.client()
    assert s3_server.keys(s3_bucket) == []
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_upload_route_still_works_on_s3(
    web: FlaskClient, ck: ChatKitClient, s3_server: S3Server, s3_bucket: str
) -> None:
    attachment = create(ck, 5, "text/plain", "a.txt")
    path = f"/chatkit/attachments/{attachment.id}/upload"
    response = web.put(path, data=b"hello", content_type="text/plain")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert web.put(path, data=b"again", content_type="text/plain").status_code == 409
    assert s3_server.keys(s3_bucket) == [f"uploads/{attachment.id}"]
    assert any(e.type == "thread.item.done" for e in send_with(ck, attachment.id))
    ck.send({"type": "attachments.delete", "params": {"attachment_id": attachment.id}})
    assert s3_server.keys(s3_bucket) == []


def test_missing_bucket_is_a_clear_503(
    tmp_path: Path, s3_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    app = create_test_app(
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CHATKIT_ATTACHMENTS_URL="s3://no-such-bucket-here/x",
    )
    web = app.test_client()
    web.post("/login/alice")
    with caplog.at_level(logging.WARNING, logger="flask_chatkit"):
        body = json.dumps(
            {
                "type": "attachments.create",
                "params": {"name": "a.txt", "size": 3, "mime_type": "text/plain"},
            }
        )
        response = web.post("/chatkit", data=body, content_type="application/json")
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "storage_unavailable"
        upload = web.post(
            "/chatkit/attachments",
            data={"file": (io.BytesIO(b"abc"), "a.txt", "text/plain")},
            content_type="multipart/form-data",
        )
        assert upload.status_code == 503
    assert "no-such-bucket-here" in caplog.text and "does not exist" in caplog.text
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, str]]:
    """A moto server of its own that checks credentials after its first request (which
    creates the bucket): every later request signed with unknown keys is refused (403),
    as AWS or MinIO refuse them."""
    try:
        server = start_s3_server(
            tmp_path_factory.mktemp("s3-strict"), extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}
        )
    except (OSError, RuntimeError, TimeoutError) as exc:
        unavailable("the S3 server (moto, with credential checks)", str(exc))
    try:
        bucket = "chatkit-strict"
        server.client().create_bucket(Bucket=bucket)
        yield server, bucket
    finally:
        stop_process(server.proc)


@pytest.fixture
def strict_env(
    strict_s3: tuple[S3Server, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[S3Server, str]:
    for key, value in strict_s3[0].env.items():
        monkeypatch.setenv(key, value)
    return strict_s3


def test_bad_credentials_are_named(
    strict_env: tuple[S3Server, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bucket = strict_env
    # The bucket exists: what is refused is the key, and the error says so.
    refused = S3Storage(f"s3://{bucket}")
    with pytest.raises(StorageUnavailable, match="credentials were refused") as caught:
        refused.check()
    assert bucket in str(caught.value)
    with pytest.raises(StorageUnavailable, match="credentials were refused"):
        refused.stat("atc_missing")  # a data call, not only the health check
    # Unreachable endpoint: StorageUnavailable naming the bucket, with another hint.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    broken = S3Storage(f"s3://{bucket}")
    with pytest.raises(StorageUnavailable, match=bucket) as caught:
        broken.check()
    assert "credentials were refused" not in str(caught.value)


def test_refused_credentials_are_a_503_and_a_log_line(
    tmp_path: Path, strict_env: tuple[S3Server, str], caplog: pytest.LogCaptureFixture
) -> None:
    """README: refused credentials are logged with the fix and answered 503
    ``storage_unavailable``; nothing of the storage's error reaches the client."""
    _, bucket = strict_env
    app = helpers.sqlite_app(tmp_path, CHATKIT_ATTACHMENTS_URL=f"s3://{bucket}/x")
    web = app.test_client()
    assert web.post("/login/alice").status_code == 200
    with caplog.at_level(logging.WARNING, logger="flask_chatkit"):
        params = {"name": "a.txt", "size": 3, "mime_type": "text/plain"}
        response = web.post("/chatkit", json={"type": "attachments.create", "params": params})
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "storage_unavailable"
    assert "credentials were refused" in caplog.text and bucket in caplog.text
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and "403" not in body and "Forbidden" not in body


def test_health_checks_the_bucket(
    s3_app: Flask, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    ok = s3_app.test_client().get("/chatkit/health")
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert ok.get_json()["checks"]["attachments"] == "ok"
    missing = create_test_app(
        instance_path=str(tmp_path / "other"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'other.sqlite3'}",
        CHATKIT_ATTACHMENTS_URL="s3://gone-bucket-here",
    )
    down = missing.test_client().get("/chatkit/health")
    assert down.status_code == 503
    assert down.get_json()["checks"]["attachments"] == "unavailable"
