"""The online answer: the thread's history through the OpenAI Agents SDK.

Imported lazily by ``example.server`` only when ``OPENAI_API_KEY`` is set, so the
offline demo never needs ``openai-agents`` to import, nor the network.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from agents import Agent, Runner
from chatkit.agents import AgentContext, ThreadItemConverter, stream_agent_response
from chatkit.store import Store
from chatkit.types import (
    Attachment,
    ThreadItem,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageTagContent,
)

from .server import setting

INSTRUCTIONS = (
    "You are the assistant of the flask-chatkit demo. Answer briefly in markdown. "
    "When the user attached files you only know their names and types; say so."
)
HISTORY_ITEMS = 30


class DemoConverter(ThreadItemConverter):
    """Attachments and tags become plain text the model can read."""

    async def attachment_to_message_content(self, attachment: Attachment) -> Any:
        return {
            "type": "input_text",
            "text": f"[attached file {attachment.name!r}, type {attachment.mime_type}]",
        }

    async def tag_to_message_content(self, tag: UserMessageTagContent) -> Any:
        return {"type": "input_text", "text": f"@{tag.text}"}


async def agent_events(
    store: Store[Any], thread: ThreadMetadata, history: Sequence[ThreadItem], context: Any
) -> AsyncIterator[ThreadStreamEvent]:
    agent = Agent(
        name="flask-chatkit demo",
        instructions=INSTRUCTIONS,
        model=setting("DEMO_OPENAI_MODEL", "gpt-4.1-mini"),
    )
    agent_context = AgentContext(thread=thread, store=store, request_context=context)
    model_input = await DemoConverter().to_agent_input(list(history)[-HISTORY_ITEMS:])
    result = Runner.run_streamed(agent, model_input, context=agent_context)
    async for event in stream_agent_response(agent_context, result):
        yield event
