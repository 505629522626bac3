"""``flask_chatkit.testing.ChatKitClient``: what users' own tests rely on."""

from __future__ import annotations

import pytest
from chatkit.types import (
    ThreadCreatedEvent,
    ThreadListParams,
    ThreadsListReq,
)

from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError


def test_send_posts_a_dict_as_is_and_the_server_answers_400(alice: ChatKitClient) -> None:
    with pytest.raises(ChatKitHTTPError) as err:
        alice.send({"type": "threads.nope", "params": {}})
    assert err.value.status == 400
    assert err.value.code == "invalid_request"
    assert err.value.message
    # A known type with bad params is the server's 400 too, not a local pydantic error.
    with pytest.raises(ChatKitHTTPError) as err:
        alice.send({"type": "threads.get_by_id", "params": {"thread_id": 5}})
    assert err.value.status == 400


def test_send_accepts_a_request_model_and_parses_results(alice: ChatKitClient) -> None:
    events = alice.create_thread("hello words=2")
    assert any(isinstance(e, ThreadCreatedEvent) for e in events)
    thread_id = next(e.thread.id for e in events if isinstance(e, ThreadCreatedEvent))
    page = alice.send(ThreadsListReq(params=ThreadListParams(limit=5)))
    assert [t.id for t in page.data] == [thread_id]
    assert alice.get_thread(thread_id).id == thread_id
    assert alice.send({"type": "threads.delete", "params": {"thread_id": thread_id}}) == {}


def test_error_fields_for_a_foreign_thread(alice: ChatKitClient, bob: ChatKitClient) -> None:
    events = alice.create_thread("mine words=1")
    thread_id = next(e.thread.id for e in events if isinstance(e, ThreadCreatedEvent))
    with pytest.raises(ChatKitHTTPError) as err:
        bob.get_thread(thread_id)
    assert (err.value.status, err.value.code) == (404, "not_found")
    assert str(err.value).startswith("404 not_found:")
