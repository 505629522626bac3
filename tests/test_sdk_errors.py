"""Requests the SDK refuses: 400 ``invalid_request`` or 501 ``not_implemented``, never a 500.

On ChatKit's own, each of these raised ValueError / NotImplementedError inside
the SDK: a 500 and a traceback in the log. The view now checks the same
conditions before ChatKit runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from chatkit.types import (
    AssistantMessageItem,
    ProgressUpdateEvent,
    StructuredInputFreeform,
    StructuredInputItem,
    SyncCustomActionResponse,
    ThreadItemDoneEvent,
    TranscriptionResult,
    UserMessageItem,
)
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient

from .apps import ScriptedServer, create_test_app
from .helpers import created_thread_id, login_as
from .memory_store import MemoryStore
from .test_endpoint import assert_json_error, post


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def transcribe_request() -> dict[str, Any]:
    audio = base64.b64encode(b"\x1a\x45\xdf\xa3 not really webm").decode()
    return {
        "type": "input.transcribe",
        "params": {"audio_base64": audio, "mime_type": "audio/webm"},
    }


def custom_action(
    thread_id: str, item_id: str | None = None, kind: str = "threads.custom_action"
) -> dict[str, Any]:
    params: dict[str, Any] = {"thread_id": thread_id, "action": {"type": "ping", "payload": {}}}
    if item_id is not None:
        params["item_id"] = item_id
    return {"type": kind, "params": params}


def thread_with_reply(alice: ChatKitClient) -> tuple[str, str, str]:
    events = alice.create_thread("hello words=2")
    done = [e.item for e in events if isinstance(e, ThreadItemDoneEvent)]
    user = next(i for i in done if isinstance(i, UserMessageItem))
    assistant = next(i for i in done if isinstance(i, AssistantMessageItem))
    return created_thread_id(events), user.id, assistant.id


def refused(
    client: FlaskClient, request: Any, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> dict[str, Any]:
    """The JSON error ``request`` is answered with; nothing logged as a failure."""
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    error = assert_json_error(post(client, request), status, code)
    assert_no_traceback(caplog)
    return error


def test_transcribe_without_transcribe_is_501(
    client: FlaskClient, alice: ChatKitClient, caplog: pytest.LogCaptureFixture
) -> None:
    error = refused(client, transcribe_request(), 501, "not_implemented", caplog)
    assert "input.transcribe" in error["message"]


def test_sync_custom_action_without_sync_action_is_501(
    client: FlaskClient, alice: ChatKitClient, caplog: pytest.LogCaptureFixture
) -> None:
    thread_id, _, _ = thread_with_reply(alice)
    action = custom_action(thread_id, kind="threads.sync_custom_action")
    error = refused(client, action, 501, "not_implemented", caplog)
    assert "threads.sync_custom_action" in error["message"]


def test_client_tool_output_without_pending_call_is_400(
    client: FlaskClient, alice: ChatKitClient, caplog: pytest.LogCaptureFixture
) -> None:
    thread_id, _, _ = thread_with_reply(alice)
    request = {
        "type": "threads.add_client_tool_output",
        "params": {"thread_id": thread_id, "result": {"ok": True}},
    }
    error = refused(client, request, 400, "invalid_request", caplog)
    assert "pending client tool call" in error["message"]
    assert len(alice.list_items(thread_id).data) == 2  # nothing changed


def test_retry_after_an_assistant_item_is_400_and_a_user_item_still_works(
    client: FlaskClient, alice: ChatKitClient, caplog: pytest.LogCaptureFixture
) -> None:
    thread_id, user_id, assistant_id = thread_with_reply(alice)
    retry: dict[str, Any] = {
        "type": "threads.retry_after_item",
        "params": {"thread_id": thread_id, "item_id": assistant_id},
    }
    error = refused(client, retry, 400, "invalid_request", caplog)
    assert "not a user message" in error["message"]
    assert [i.id for i in alice.list_items(thread_id).data] == [user_id, assistant_id]

    retry["params"]["item_id"] = user_id
    events = alice.send(retry)
    assert any(isinstance(e, ThreadItemDoneEvent) for e in events)


class FullServer(ScriptedServer):
    """Implements the optional operations, so none of them is a 501."""

    async def transcribe(self, audio_input: Any, context: Any) -> TranscriptionResult:
        return TranscriptionResult(text=f"{len(audio_input.data)} bytes")

    actions: list[tuple[str, str, str]] = []  # (thread id, action type, user) it ran

    async def sync_action(
        self, thread: Any, action: Any, sender: Any, context: Any
    ) -> SyncCustomActionResponse:
        FullServer.actions.append((thread.id, action.type, context.user_id))
        return SyncCustomActionResponse()


def test_implemented_operations_are_served_and_a_non_widget_sender_is_400(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_test_app(
        store=MemoryStore(), server_cls=FullServer, instance_path=str(tmp_path / "i")
    )
    alice = login_as(app, "alice")
    client = alice.client
    response = post(client, transcribe_request())
    assert response.status_code == 200 and response.get_json()["text"].endswith("bytes")

    thread_id, user_id, _ = thread_with_reply(alice)
    FullServer.actions.clear()
    served = post(client, custom_action(thread_id, kind="threads.sync_custom_action"))
    assert served.status_code == 200, served.get_data(as_text=True)
    assert served.get_json() == {}  # the SDK's empty SyncCustomActionResponse, as JSON
    assert FullServer.actions == [(thread_id, "ping", "alice")]  # sync_action ran, once
    action = custom_action(thread_id, user_id, kind="threads.sync_custom_action")
    error = refused(client, action, 400, "invalid_request", caplog)
    assert "not a widget" in error["message"]


# -- threads.custom_action and threads.add_structured_input ------------------------------


def test_custom_action_without_action_is_501(
    client: FlaskClient, alice: ChatKitClient, caplog: pytest.LogCaptureFixture
) -> None:
    thread_id, _, _ = thread_with_reply(alice)
    error = refused(client, custom_action(thread_id), 501, "not_implemented", caplog)
    assert "threads.custom_action" in error["message"]
    assert "ScriptedServer.action" in error["message"]


class ActionServer(ScriptedServer):
    async def action(self, thread: Any, action: Any, sender: Any, context: Any) -> Any:
        yield ProgressUpdateEvent(text=f"ran {action.type}")


def test_custom_action_on_a_non_widget_item_is_400_and_without_an_item_it_runs(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_test_app(
        store=MemoryStore(), server_cls=ActionServer, instance_path=str(tmp_path / "i")
    )
    alice = login_as(app, "alice")
    thread_id, user_id, assistant_id = thread_with_reply(alice)
    ran = alice.send(custom_action(thread_id))  # served: the server has `action`
    assert [e.text for e in ran if isinstance(e, ProgressUpdateEvent)] == ["ran ping"]
    caplog.set_level(logging.DEBUG)
    for item_id in (user_id, assistant_id):
        response = post(alice.client, custom_action(thread_id, item_id))
        error = assert_json_error(response, 400, "invalid_request")
        assert f"Item {item_id} is not a widget" in error["message"]
    assert_no_traceback(caplog)


def structured_input(thread_id: str, item_id: str) -> dict[str, Any]:
    return {
        "type": "threads.add_structured_input",
        "params": {
            "thread_id": thread_id,
            "item_id": item_id,
            "input": {"status": "answered", "answers": {}},
        },
    }


def test_structured_input_for_an_item_that_is_not_a_pending_question_is_400(
    client: FlaskClient, alice: ChatKitClient, store: MemoryStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    thread_id, user_id, _ = thread_with_reply(alice)
    answered = StructuredInputItem(
        id="si_answered", thread_id=thread_id, created_at=datetime.now(), status="answered",
        inputs=[StructuredInputFreeform(id="q1", question="Name?")],
    )
    asyncio.run(store.add_thread_item(thread_id, answered, SimpleNamespace(user_id="alice")))
    caplog.set_level(logging.DEBUG)
    error = assert_json_error(post(client, structured_input(thread_id, user_id)), 400,
                              "invalid_request")
    assert error["message"] == f"Item {user_id} is not a structured input item."
    error = assert_json_error(post(client, structured_input(thread_id, "si_answered")), 400,
                              "invalid_request")
    assert error["message"] == "Structured input item si_answered is not pending."
    assert_no_traceback(caplog)
    # Neither request touched the thread.
    assert [i.id for i in alice.list_items(thread_id).data][-1] == "si_answered"
