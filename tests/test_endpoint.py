"""The ChatKit endpoint through the Flask test client: happy paths and the error contract."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chatkit.types import (
    AssistantMessageItem,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    UserMessageItem,
)
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from .helpers import created_thread_id
from .memory_store import MemoryStore


def post(client: FlaskClient, payload: Any, **kwargs: Any) -> Any:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    kwargs.setdefault("content_type", "application/json")
    return client.post("/chatkit", data=body, **kwargs)


def assert_json_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return error


def test_create_thread_streams_user_message_and_reply(alice: ChatKitClient) -> None:
    events = alice.create_thread("hello words=4")
    thread_id = created_thread_id(events)
    deltas = [e.update.delta for e in events if isinstance(e, ThreadItemUpdatedEvent)]
    assert deltas == ["w0 ", "w1 ", "w2 ", "w3 "]
    done = [e.item for e in events if isinstance(e, ThreadItemDoneEvent)]
    assert isinstance(done[0], UserMessageItem) and isinstance(done[-1], AssistantMessageItem)

    items = alice.list_items(thread_id).data
    assert [type(i) for i in items] == [UserMessageItem, AssistantMessageItem]
    assert items[1].content[0].text == "w0 w1 w2 w3 "
    assert alice.get_thread(thread_id).id == thread_id
    assert [t.id for t in alice.list_threads().data] == [thread_id]


def test_streaming_response_headers(client: FlaskClient, alice: ChatKitClient) -> None:
    response = post(
        client,
        {"type": "threads.create", "params": {"input": ChatKitClient._input("hi")}},
    )
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Request-ID"]


def test_add_user_message_continues_thread(alice: ChatKitClient) -> None:
    thread_id = created_thread_id(alice.create_thread("first words=1"))
    alice.add_user_message(thread_id, "second words=2")
    texts = [
        i.content[0].text
        for i in alice.list_items(thread_id).data
        if isinstance(i, UserMessageItem)
    ]
    assert texts == ["first words=1", "second words=2"]


def test_context_is_visible_inside_respond(
    app: Flask, client: FlaskClient, alice: ChatKitClient
) -> None:
    payload = {
        "type": "threads.create",
        "params": {"input": ChatKitClient._input("hi words=1")},
        "metadata": {"tenant": "acme"},
    }
    response = post(client, payload, headers={"Accept-Language": "fr-CA, en;q=0.5"})
    assert response.status_code == 200
    response.get_data()  # drive the stream to its end
    seen = app.extensions["chatkit"].server.observations[-1]
    assert seen == {
        "app": app.name,
        "path": "/chatkit",
        "g_marker": "set-in-before-request",
        "user": "alice",
        "context_user": "alice",
        "locale": "fr-CA",
        "metadata": {"tenant": "acme"},
        "attachments": [],
    }


# -- the error contract --------------------------------------------------------


def test_not_logged_in_is_401(client: FlaskClient) -> None:
    response = post(client, {"type": "threads.list", "params": {}})
    assert_json_error(response, 401, "unauthorized")


def test_malformed_json_is_400(client: FlaskClient, alice: ChatKitClient) -> None:
    error = assert_json_error(post(client, b'{"type": "threads.list"'), 400, "invalid_request")
    assert "Malformed JSON" in error["message"]


def test_unknown_request_type_is_400(client: FlaskClient, alice: ChatKitClient) -> None:
    error = assert_json_error(
        post(client, {"type": "threads.explode", "params": {}}), 400, "invalid_request"
    )
    assert "type" in error["message"]


def test_invalid_params_are_400_with_the_field(client: FlaskClient, alice: ChatKitClient) -> None:
    error = assert_json_error(
        post(client, {"type": "threads.get_by_id", "params": {}}), 400, "invalid_request"
    )
    assert "thread_id" in error["message"]


def test_deeply_nested_json_is_400_not_a_crash(client: FlaskClient, alice: ChatKitClient) -> None:
    body = '{"type": "threads.list", "params": {}, "metadata": ' + "[" * 5000 + "]" * 5000 + "}"
    assert_json_error(post(client, body), 400, "invalid_request")
    assert alice.list_threads().data == []  # still serving


def test_wrong_content_type_is_415(client: FlaskClient, alice: ChatKitClient) -> None:
    response = client.post(
        "/chatkit", data='{"type": "threads.list", "params": {}}', content_type="text/plain"
    )
    assert_json_error(response, 415, "unsupported_media_type")


def test_oversize_body_is_413(
    app: Flask, client: FlaskClient, alice: ChatKitClient, store: MemoryStore
) -> None:
    limit = app.extensions["chatkit"].settings.max_request_bytes
    text = "x" * (limit + 10)
    response = post(
        client, {"type": "threads.create", "params": {"input": ChatKitClient._input(text)}}
    )
    assert_json_error(response, 413, "payload_too_large")
    assert store.threads == {}  # nothing was written


def test_wrong_method_is_405_with_allow(client: FlaskClient) -> None:
    response = client.get("/chatkit")
    assert_json_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_nonpositive_limit_is_400_and_large_limit_is_clamped(store: MemoryStore) -> None:
    from .apps import create_test_app

    client = create_test_app(store=store, CHATKIT_MAX_PAGE_SIZE=2).test_client()
    client.post("/login/alice")
    alice = ChatKitClient(client)
    for limit in (0, -3):
        response = post(client, {"type": "threads.list", "params": {"limit": limit}})
        assert_json_error(response, 400, "invalid_request")
    for index in range(3):
        alice.create_thread(f"t{index} words=0")
    page = alice.send({"type": "threads.list", "params": {"limit": 1000}})
    assert len(page.data) == 2 and page.has_more
    thread_id = page.data[0].id
    alice.add_user_message(thread_id, "more words=0")
    items = alice.send({"type": "items.list", "params": {"thread_id": thread_id, "limit": 50}})
    assert len(items.data) == 2 and items.has_more


def test_unknown_after_cursor_is_404(client: FlaskClient, alice: ChatKitClient) -> None:
    thread_id = created_thread_id(alice.create_thread("a words=1"))
    assert_json_error(
        post(client, {"type": "threads.list", "params": {"after": "thr_nope"}}), 404, "not_found"
    )
    assert_json_error(
        post(
            client, {"type": "items.list", "params": {"thread_id": thread_id, "after": "msg_nope"}}
        ),
        404,
        "not_found",
    )


FOREIGN_REQUESTS = [
    {"type": "threads.get_by_id", "params": {"thread_id": "{tid}"}},
    {"type": "items.list", "params": {"thread_id": "{tid}"}},
    {"type": "threads.delete", "params": {"thread_id": "{tid}"}},
    {"type": "threads.update", "params": {"thread_id": "{tid}", "title": "pwned"}},
    {
        "type": "threads.add_user_message",
        "params": {"thread_id": "{tid}", "input": ChatKitClient._input("x")},
    },
    {"type": "threads.retry_after_item", "params": {"thread_id": "{tid}", "item_id": "{iid}"}},
    {
        "type": "items.feedback",
        "params": {"thread_id": "{tid}", "item_ids": ["{iid}"], "kind": "positive"},
    },
]


@pytest.mark.parametrize("template", FOREIGN_REQUESTS, ids=lambda t: t["type"])
def test_foreign_thread_is_404_and_untouched(
    client: FlaskClient, alice: ChatKitClient, bob: ChatKitClient, template: dict[str, Any]
) -> None:
    thread_id = created_thread_id(alice.create_thread("secret words=2"))
    item_id = alice.list_items(thread_id).data[0].id
    before = alice.list_items(thread_id).data
    payload = json.loads(json.dumps(template).replace("{tid}", thread_id).replace("{iid}", item_id))
    with pytest.raises(ChatKitHTTPError) as err:
        bob.send(payload)
    assert (err.value.status, err.value.code) == (404, "not_found")
    # Unknown ids get the very same answer as foreign ones.
    unknown = json.loads(
        json.dumps(template).replace("{tid}", "thr_unknown").replace("{iid}", item_id)
    )
    with pytest.raises(ChatKitHTTPError) as err:
        bob.send(unknown)
    assert err.value.status == 404
    assert alice.get_thread(thread_id).title is None
    assert alice.list_items(thread_id).data == before


def test_foreign_attachment_in_message_is_404(
    alice: ChatKitClient, bob: ChatKitClient, store: MemoryStore
) -> None:
    from chatkit.types import FileAttachment

    store.attachments["atc_alice"] = (
        "alice",
        FileAttachment(id="atc_alice", name="a.txt", mime_type="text/plain"),
    )
    with pytest.raises(ChatKitHTTPError) as err:
        bob.create_thread("hi", attachments=["atc_alice"])
    assert err.value.status == 404
    assert bob.list_threads().data == []  # nothing half-created


def test_failure_inside_respond_ends_stream_with_error_event(alice: ChatKitClient) -> None:
    events = alice.create_thread("boom fail=1")
    assert events[-1].type == "error"
    # The user message was still saved and the server keeps serving.
    thread_id = created_thread_id(events)
    assert isinstance(alice.list_items(thread_id).data[0], UserMessageItem)


def test_server_fault_is_500_json_with_request_id(
    app: Flask, client: FlaskClient, alice: ChatKitClient, store: MemoryStore, caplog: Any
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database exploded")

    store.load_threads = broken  # type: ignore[method-assign]
    response = post(client, {"type": "threads.list", "params": {}})
    error = assert_json_error(response, 500, "internal_error")
    request_id = response.headers["X-Request-ID"]
    assert request_id in error["message"]
    assert "database exploded" not in response.get_data(as_text=True)
    assert any(request_id in r.getMessage() for r in caplog.records)


def test_origin_rule(
    app: Flask, client: FlaskClient, alice: ChatKitClient, store: MemoryStore
) -> None:
    create = {"type": "threads.create", "params": {"input": ChatKitClient._input("hi words=0")}}
    assert_json_error(
        post(client, create, headers={"Origin": "https://evil.example"}), 403, "forbidden"
    )
    assert store.threads == {}
    # Same origin passes (the test client's host is localhost).
    assert post(client, create, headers={"Origin": "http://localhost"}).status_code == 200


def test_cors_for_allowed_origins(store: MemoryStore, tmp_path: Any) -> None:
    from .apps import create_test_app

    app = create_test_app(store=store, CHATKIT_ALLOWED_ORIGINS=["https://app.example"])
    client = app.test_client()
    client.post("/login/alice")
    preflight = client.options(
        "/chatkit",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = post(
        client, {"type": "threads.list", "params": {}}, headers={"Origin": "https://app.example"}
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    other = client.options("/chatkit", headers={"Origin": "https://app.example.evil"})
    assert_json_error(other, 403, "forbidden")


def test_unknown_path_under_prefix_is_json_404(client: FlaskClient) -> None:
    assert_json_error(client.get("/chatkit/nope/../x"), 404, "not_found")
    assert_json_error(client.post("/chatkit/attachments/a/b/c/d"), 404, "not_found")


def test_authentication_comes_before_parsing(client: FlaskClient) -> None:
    assert_json_error(post(client, b"{not json"), 401, "unauthorized")
    assert_json_error(post(client, {"type": "nonsense"}), 401, "unauthorized")


def test_request_id_is_kept_only_when_it_is_a_plain_token(
    client: FlaskClient, alice: ChatKitClient
) -> None:
    payload = {"type": "threads.list", "params": {}}
    kept = post(client, payload, headers={"X-Request-ID": "req-123.abc"})
    assert kept.headers["X-Request-ID"] == "req-123.abc"
    for bad in ("two words", "x" * 65, "<script>"):
        replaced = post(client, payload, headers={"X-Request-ID": bad})
        assert replaced.headers["X-Request-ID"] != bad
        assert len(replaced.headers["X-Request-ID"]) == 32
