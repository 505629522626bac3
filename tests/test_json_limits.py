"""Memory amplification: a body within CHATKIT_MAX_REQUEST_BYTES costs < 10x its size.

Before: a 4 MiB ``{"metadata": {"a": [{}, {}, …]}}`` (1.4 M empty objects) was
parsed in full (~25x its size in peak memory, ~2 s of CPU on the hub) and its
metadata kept in the context for the whole stream.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient
from flask_chatkit.web.request_body import BYTES_PER_JSON_VALUE, parse_request

from .test_endpoint import assert_json_error, post

MAX_FACTOR = 10


def fill(prefix: bytes, element: bytes, suffix: bytes, size: int) -> bytes:
    """``prefix element,element,… suffix`` of about ``size`` bytes."""
    count = (size - len(prefix) - len(suffix)) // (len(element) + 1)
    return prefix + b",".join([element] * count) + suffix


def padded(element: bytes, values: int) -> bytes:
    """``element`` padded so it (with its comma) is exactly the per-value allowance."""
    return element + b" " * (values * BYTES_PER_JSON_VALUE - len(element) - 1)


def peak_memory(call: Callable[[], Any]) -> tuple[Any, int]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def post_measured(client: FlaskClient, body: bytes) -> tuple[Any, int]:
    def call() -> Any:
        response = post(client, body)
        response.get_data()  # drain a stream too
        return response

    return peak_memory(call)


METADATA = b'{"type":"threads.list","params":{},"metadata":{"a":['


def test_pathological_metadata_is_413_at_bounded_memory(
    app: Flask, client: FlaskClient, alice: ChatKitClient
) -> None:
    size = app.extensions["chatkit"].settings.max_request_bytes
    body = fill(METADATA, b"{}", b"]}}", size)
    response, peak = post_measured(client, body)
    error = assert_json_error(response, 413, "payload_too_large")
    assert "too many values" in error["message"]
    assert peak < MAX_FACTOR * len(body), f"peak {peak / len(body):.1f}x the body"
    assert alice.list_threads().data == []  # still serving


@pytest.mark.parametrize(
    "element",
    [
        padded(b"{}", 2),  # one object and its comma
        padded(b'"ab"', 1),
        padded(b"[[[{}]]]", 5),
        padded(b'{"k":[1,2]}', 4),
    ],
    ids=["objects", "strings", "nested", "mixed"],
)
def test_densest_shape_within_the_budget_costs_under_10x(
    app: Flask, client: FlaskClient, alice: ChatKitClient, element: bytes
) -> None:
    size = app.extensions["chatkit"].settings.max_request_bytes
    body = fill(METADATA, element, b"]}}", size)
    response, peak = post_measured(client, body)
    # Parsed (the shape is allowed), then refused: far over the metadata cap.
    error = assert_json_error(response, 413, "payload_too_large")
    assert "metadata" in error["message"]
    assert peak < MAX_FACTOR * len(body), f"peak {peak / len(body):.1f}x the body"


def test_commas_inside_a_long_text_are_not_values(
    app: Flask, client: FlaskClient, alice: ChatKitClient
) -> None:
    # 320 KB of brackets, commas and escapes, all inside one string (no spaces:
    # the test server splits the text into words, which would dwarf the rest).
    text = 'a,[b],{c},"d"\\,' * 20_000
    assert len(text) // BYTES_PER_JSON_VALUE < text.count(",")
    request = {"type": "threads.create", "params": {"input": ChatKitClient._input(text)}}
    body = json.dumps(request).encode()
    response = post(client, body)
    assert response.status_code == 200 and b"thread.item.done" in response.get_data()
    thread_id = alice.list_threads().data[0].id
    assert alice.list_items(thread_id).data[0].content[0].text == text
    # The pre-scan itself stays cheap on it: no copy of the body per string.
    _, peak = peak_memory(lambda: parse_request(body))
    assert peak < 3 * len(body), f"peak {peak / len(body):.1f}x the body"


def test_serialized_metadata_over_the_limit_is_413(
    app: Flask, client: FlaskClient, alice: ChatKitClient
) -> None:
    limit = app.extensions["chatkit"].settings.max_metadata_bytes
    request = {"type": "threads.list", "params": {}, "metadata": {"k": "x" * limit}}
    error = assert_json_error(post(client, json.dumps(request)), 413, "payload_too_large")
    assert str(limit) in error["message"]

    small = {"k": "x" * (limit - 100)}
    request = {
        "type": "threads.create",
        "params": {"input": ChatKitClient._input("hi words=1")},
        "metadata": small,
    }
    created = post(client, json.dumps(request))
    assert created.status_code == 200
    # Read to the end: thread.created comes before respond() runs.
    assert b"thread.item.done" in created.get_data()
    observed = client.get("/_test/observations").get_json()["observations"]
    assert observed[-1]["metadata"] == small  # the context still carries it


def test_content_parts_and_attachments_are_capped(
    client: FlaskClient, alice: ChatKitClient
) -> None:
    from flask_chatkit.web.checks import MAX_CONTENT_PARTS, MAX_ITEM_IDS

    user_input = ChatKitClient._input("hi")
    user_input["content"] = user_input["content"] * (MAX_CONTENT_PARTS + 1)
    request = {"type": "threads.create", "params": {"input": user_input}}
    assert_json_error(post(client, json.dumps(request)), 400, "invalid_request")

    user_input = ChatKitClient._input("hi")
    user_input["attachments"] = [f"atc_{n}" for n in range(MAX_ITEM_IDS + 1)]
    request = {"type": "threads.create", "params": {"input": user_input}}
    assert_json_error(post(client, json.dumps(request)), 400, "invalid_request")
    assert alice.list_threads().data == []


def test_request_type_peek_does_not_build_a_pathological_body(app: Flask) -> None:
    from flask_chatkit import chatkit_request_type

    size = app.extensions["chatkit"].settings.max_request_bytes
    body = fill(b'{"type":"threads.create","metadata":{"a":[', b"{}", b"]}}", size)
    with app.test_request_context(
        "/chatkit", method="POST", data=body, content_type="application/json"
    ):
        kind, peak = peak_memory(chatkit_request_type)
    assert kind is None  # unreadable here; the endpoint answers 413
    assert peak < MAX_FACTOR * len(body), f"peak {peak / len(body):.1f}x the body"
