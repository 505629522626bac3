"""The parse-once fast path must behave exactly like ChatKit's own process()."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import chatkit.server
import pytest
from chatkit.server import NonStreamingResult, StreamingResult

from flask_chatkit import RequestContext
from flask_chatkit.web.endpoint import process as process_parsed
from flask_chatkit.web.request_body import parse_request

from .apps import ScriptedServer, create_test_app
from .memory_store import MemoryStore
from .test_endpoint import thread_id_of

CONTEXT = RequestContext(user_id="alice")


async def collect(result: Any) -> Any:
    if isinstance(result, StreamingResult):
        return [json.loads(chunk[6:]) async for chunk in result]
    assert isinstance(result, NonStreamingResult)
    return json.loads(result.json)


def run_both(server: ScriptedServer, payload: dict[str, Any]) -> tuple[Any, Any]:
    raw = json.dumps(payload).encode()

    async def go() -> tuple[Any, Any]:
        sdk = await collect(await server.process(raw, CONTEXT))
        ours = await collect(await process_parsed(server, parse_request(raw), raw, CONTEXT))
        return sdk, ours

    # ScriptedServer reads flask.request & co. inside respond().
    with create_test_app(store=MemoryStore()).test_request_context("/chatkit"):
        return asyncio.run(go())


def shape(events: list[dict[str, Any]]) -> list[Any]:
    return [(e["type"], e.get("update", {}).get("delta")) for e in events]


def test_fast_path_matches_sdk_process() -> None:
    server = ScriptedServer(MemoryStore())
    create = {
        "type": "threads.create",
        "params": {
            "input": {
                "content": [{"type": "input_text", "text": "words=3"}],
                "attachments": [],
                "inference_options": {},
            }
        },
    }
    sdk_events, our_events = run_both(server, create)
    assert shape(sdk_events) == shape(our_events) and len(our_events) > 5
    thread_id = our_events[0]["thread"]["id"]
    for payload in (
        {"type": "threads.list", "params": {"limit": 5}},
        {"type": "items.list", "params": {"thread_id": thread_id, "order": "asc"}},
        {"type": "threads.get_by_id", "params": {"thread_id": thread_id}},
        {"type": "threads.update", "params": {"thread_id": thread_id, "title": "T"}},
    ):
        sdk, ours = run_both(server, payload)
        assert sdk == ours, payload["type"]


def test_overridden_process_is_respected() -> None:
    calls: list[bytes] = []

    class Custom(ScriptedServer):
        async def process(self, request: Any, context: Any) -> Any:
            calls.append(bytes(request))
            return await super().process(request, context)

    server = Custom(MemoryStore())
    raw = b'{"type": "threads.list", "params": {}}'
    result = asyncio.run(process_parsed(server, parse_request(raw), raw, CONTEXT))
    assert isinstance(result, NonStreamingResult) and calls == [raw]


def test_view_never_builds_a_type_adapter_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []
    original = chatkit.server.TypeAdapter

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(chatkit.server, "TypeAdapter", counting)
    app = create_test_app(store=MemoryStore())
    client = app.test_client()
    client.post("/login/alice")
    from flask_chatkit.testing import ChatKitClient

    kit = ChatKitClient(client)
    thread_id = thread_id_of(kit.create_thread("hi words=2"))
    kit.list_threads()
    kit.list_items(thread_id)
    assert built == []


def test_fast_path_is_on_for_the_pinned_sdk_and_guards_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flask_chatkit.web import endpoint

    # The installed SDK is the one the fast path was written against.
    assert endpoint.SDK_PROCESS_UNCHANGED
    monkeypatch.setattr(endpoint, "SDK_PROCESS_UNCHANGED", False)
    server = ScriptedServer(MemoryStore())
    calls: list[bytes] = []
    original = ScriptedServer.process

    async def spy(self: Any, request: Any, context: Any) -> Any:
        calls.append(request)
        return await original(self, request, context)

    monkeypatch.setattr(chatkit.server.ChatKitServer, "process", spy)
    raw = b'{"type": "threads.list", "params": {}}'
    asyncio.run(process_parsed(server, parse_request(raw), raw, CONTEXT))
    assert calls == [raw]
