"""A host-neutral ChatKit server that streams ``words=N`` deltas, ``delay=S`` apart.

``pad=K`` makes each word K characters longer (big replies in few events).

No Flask here: the benchmark runs the same class under FastAPI/uvicorn, and
``tests.apps.ScriptedServer`` adds the Flask-side observations on top.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from chatkit.server import ChatKitServer
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
)


def message_options(input: UserMessageItem | None) -> dict[str, str]:
    """``key=value`` words of the user's message text."""
    text = ""
    if input is not None:
        text = " ".join(c.text for c in input.content if getattr(c, "text", None))
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def empty_reply(
    server: ChatKitServer[Any], thread: ThreadMetadata, context: Any
) -> AssistantMessageItem:
    """The assistant message a reply starts with; its text arrives as deltas."""
    return AssistantMessageItem(
        id=server.store.generate_item_id("message", thread, context),
        thread_id=thread.id,
        created_at=datetime.now(),
        content=[AssistantMessageContent(text="")],
    )


def text_delta(item_id: str, text: str) -> ThreadItemUpdatedEvent:
    return ThreadItemUpdatedEvent(
        item_id=item_id,
        update=AssistantMessageContentPartTextDelta(content_index=0, delta=text),
    )


class WordServer(ChatKitServer[Any]):
    """Streams ``w0 w1 …``: one assistant message, one delta per word."""

    cancelled = 0  # how many replies a CancelledError interrupted

    async def respond(
        self, thread: ThreadMetadata, input: UserMessageItem | None, context: Any
    ) -> AsyncIterator[ThreadStreamEvent]:
        options = message_options(input)
        self.before_reply(options, input, context)
        words = int(options.get("words", 3))
        delay = float(options.get("delay", 0))
        pad = "x" * int(options.get("pad", 0))
        item = empty_reply(self, thread, context)
        yield ThreadItemAddedEvent(item=item)
        if options.get("part"):  # open the text part first, as model-driven replies do
            yield ThreadItemUpdatedEvent(item_id=item.id, update=AssistantMessageContentPartAdded(
                content_index=0, content=AssistantMessageContent(text="")))  # fmt: skip
        parts = []
        try:
            for index in range(words):
                if delay:
                    await asyncio.sleep(delay)
                word = f"w{index}{pad} "
                parts.append(word)
                yield text_delta(item.id, word)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        item.content = [AssistantMessageContent(text="".join(parts))]
        yield ThreadItemDoneEvent(item=item)

    def before_reply(
        self, options: dict[str, str], input: UserMessageItem | None, context: Any
    ) -> None:
        """Hook for subclasses, called inside ``respond`` before the first event."""
