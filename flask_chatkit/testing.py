"""Test your ChatKit server through Flask's test client, with typed results.

Example (pytest)::

    from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError
    from chatkit.types import ThreadCreatedEvent

    def test_chat(app):
        client = app.test_client()
        client.post("/login", data={"username": "ada"})    # however your app logs in
        kit = ChatKitClient(client)
        events = kit.create_thread("Hello!")
        thread_id = next(e.thread.id for e in events if isinstance(e, ThreadCreatedEvent))
        kit.add_user_message(thread_id, "And again")
        assert [i.type for i in kit.list_items(thread_id).data][:1] == ["user_message"]
        with pytest.raises(ChatKitHTTPError) as err:
            kit.get_thread("thr_missing")
        assert err.value.status == 404

Streaming requests return ``list[ThreadStreamEvent]``; others return what the
endpoint answered, parsed: ``Thread``, ``Page``, ``Attachment``… or ``dict``.
``send`` posts a dict exactly as given (no local validation), so tests can
exercise the server's own error paths: an invalid request raises
``ChatKitHTTPError`` with the server's status (e.g. 400), not a pydantic error.
"""

from __future__ import annotations

import json
from typing import Any

from chatkit.types import (
    Attachment,
    ChatKitReq,
    Page,
    SyncCustomActionResponse,
    Thread,
    ThreadItem,
    ThreadStreamEvent,
    TranscriptionResult,
)
from flask.testing import FlaskClient
from pydantic import BaseModel, TypeAdapter
from pydantic_core import to_json

_EVENT_ADAPTER: TypeAdapter[ThreadStreamEvent] = TypeAdapter(ThreadStreamEvent)

# What each non-streaming request answers, by request type.
_RESULT_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "threads.get_by_id": TypeAdapter(Thread),
    "threads.update": TypeAdapter(Thread),
    "threads.list": TypeAdapter(Page[Thread]),
    "items.list": TypeAdapter(Page[ThreadItem]),
    "attachments.create": TypeAdapter(Attachment),
    "input.transcribe": TypeAdapter(TranscriptionResult),
    "threads.sync_custom_action": TypeAdapter(SyncCustomActionResponse),
}


class ChatKitHTTPError(Exception):
    """The endpoint answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def parse_sse(body: bytes) -> list[ThreadStreamEvent]:
    """Parse a ``text/event-stream`` body into ChatKit events (heartbeats skipped)."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        data = "\n".join(
            line[len("data:") :].lstrip(" ")
            for line in block.splitlines()
            if line.startswith("data:")
        )
        if data:
            events.append(_EVENT_ADAPTER.validate_json(data))
    return events


class ChatKitClient:
    """Send ChatKit requests through a Flask test client."""

    def __init__(self, client: FlaskClient, path: str = "/chatkit") -> None:
        self.client = client
        self.path = path

    def send(self, request: ChatKitReq | dict[str, Any]) -> Any:
        """POST one ChatKit request and return the parsed answer.

        A dict is sent as is (the server validates it); a ``chatkit.types``
        request model is serialized by its aliases. A ``text/event-stream``
        answer becomes ``list[ThreadStreamEvent]``; JSON is parsed by request
        type. Any status >= 400 raises :class:`ChatKitHTTPError`.
        """
        if isinstance(request, BaseModel):
            kind: Any = request.type
            data = request.model_dump_json(by_alias=True).encode()
        else:
            kind = request.get("type") if isinstance(request, dict) else None
            data = to_json(request, by_alias=True)
        response = self.client.post(self.path, data=data, content_type="application/json")
        body = response.get_data()
        if response.status_code >= 400:
            raise _http_error(response.status_code, body)
        if response.mimetype == "text/event-stream":
            return parse_sse(body)
        adapter = _RESULT_ADAPTERS.get(kind) if isinstance(kind, str) else None
        return adapter.validate_json(body) if adapter else json.loads(body)

    # -- conveniences -----------------------------------------------------
    @staticmethod
    def _input(text: str, attachments: list[str] | None = None) -> dict[str, Any]:
        return {
            "content": [{"type": "input_text", "text": text}],
            "attachments": attachments or [],
            "inference_options": {},
        }

    def create_thread(
        self, text: str, attachments: list[str] | None = None
    ) -> list[ThreadStreamEvent]:
        result: list[ThreadStreamEvent] = self.send(
            {"type": "threads.create", "params": {"input": self._input(text, attachments)}}
        )
        return result

    def add_user_message(
        self, thread_id: str, text: str, attachments: list[str] | None = None
    ) -> list[ThreadStreamEvent]:
        result: list[ThreadStreamEvent] = self.send(
            {
                "type": "threads.add_user_message",
                "params": {"thread_id": thread_id, "input": self._input(text, attachments)},
            }
        )
        return result

    def list_threads(self, limit: int | None = None, order: str = "desc") -> Page[Thread]:
        params: dict[str, Any] = {"order": order}
        if limit is not None:
            params["limit"] = limit
        result: Page[Thread] = self.send({"type": "threads.list", "params": params})
        return result

    def list_items(self, thread_id: str, limit: int | None = None) -> Page[ThreadItem]:
        params: dict[str, Any] = {"thread_id": thread_id, "order": "asc"}
        if limit is not None:
            params["limit"] = limit
        result: Page[ThreadItem] = self.send({"type": "items.list", "params": params})
        return result

    def get_thread(self, thread_id: str) -> Thread:
        result: Thread = self.send(
            {"type": "threads.get_by_id", "params": {"thread_id": thread_id}}
        )
        return result


def _http_error(status: int, body: bytes) -> ChatKitHTTPError:
    try:
        error = json.loads(body)["error"]
        return ChatKitHTTPError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ChatKitHTTPError(status, "http_error", body.decode("utf-8", "replace")[:500])
