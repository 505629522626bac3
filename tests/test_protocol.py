"""The parse-once fast path must behave exactly like ChatKit's own process()."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import chatkit.server
import pytest
from chatkit.server import NonStreamingResult, StreamingResult

from flask_chatkit import RequestContext
from flask_chatkit.web.endpoint import process as process_parsed
from flask_chatkit.web.request_body import parse_request

from .apps import ScriptedServer, create_test_app
from .helpers import created_thread_id
from .memory_store import MemoryStore

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
    thread_id = created_thread_id(kit.create_thread("hi words=2"))
    kit.list_threads()
    kit.list_items(thread_id)
    assert built == []


# Run in a fresh interpreter: the SDK is changed (or not) BEFORE flask_chatkit is
# imported, as a different installed SDK would be; then requests go through the test
# client, and a spy on the SDK's public ChatKitServer.process counts its calls.
_SDK_PROBE = """
import sys
import chatkit.server, chatkit.version

change = sys.argv[1]
if change == "major":  # the next major version of the SDK
    chatkit.version.__version__ = "2.0.0"
elif change == "process":  # a process() that does something new
    sdk_process = chatkit.server.ChatKitServer.process

    async def process(self, request, context):
        request = bytes(request)  # something the fast path does not know about
        return await sdk_process(self, request, context)

    chatkit.server.ChatKitServer.process = process

from flask_chatkit.testing import ChatKitClient
from tests.apps import create_test_app
from tests.memory_store import MemoryStore

app = create_test_app(store=MemoryStore())
client = app.test_client()
assert client.post("/login/alice").status_code == 200
kit = ChatKitClient(client)
kit.list_threads()  # everything imported and decided from here on

calls = []
current = chatkit.server.ChatKitServer.process

async def spy(self, request, context):
    calls.append(request)
    return await current(self, request, context)

chatkit.server.ChatKitServer.process = spy
created = [e.thread.id for e in kit.create_thread("hi words=2") if e.type == "thread.created"]
assert [t.id for t in kit.list_threads().data] == created  # served right either way
print(len(calls))
"""


@pytest.mark.parametrize(
    ("change", "through_process"),
    [("none", False), ("major", True), ("process", True)],
)
def test_fast_path_is_on_for_the_pinned_sdk_and_off_for_a_changed_one(
    change: str, through_process: bool
) -> None:
    """The pinned SDK: requests skip ChatKitServer.process (the fast path). Another
    major version, or a process() that does something new: every request goes
    through process() again, and is served the same."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _SDK_PROBE, change], cwd=root, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    calls = int(result.stdout.split()[-1])
    assert (calls >= 2) if through_process else (calls == 0), (change, calls)
