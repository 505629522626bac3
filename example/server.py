"""The demo ChatKit server: an offline, deterministic responder (and OpenAI when configured).

Offline, it streams a markdown answer word by word and shows off the ChatKit event
types a UI has to handle: a progress update, a workflow with tasks, a widget whose
button triggers ``action()``, a thread title, and a reply that depends on the thread's
history and on the attachments of the message. Keywords (whole words) in the user's message:

- ``long``      a ~200-word answer (for stop/cancel tests)
- ``workflow``  a small workflow (WorkflowItem with tasks) before the answer
- ``widget``    a Card with a Button; pressing it streams another reply
- ``fail``      the stream ends with a ChatKit error event

With ``OPENAI_API_KEY`` set (and ``DEMO_OFFLINE`` false) the answer comes from the
Agents SDK instead; any failure there falls back to the offline responder.

Cancellation needs nothing here: the SDK persists the partial reply when the
``CancelledError`` raised in ``asyncio.sleep`` (or in the model call) propagates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from chatkit.actions import Action
from chatkit.errors import CustomStreamError
from chatkit.server import ChatKitServer
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    CustomSummary,
    CustomTask,
    ProgressUpdateEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemReplacedEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
    WidgetItem,
    Workflow,
    WorkflowItem,
    WorkflowTaskAdded,
    WorkflowTaskUpdated,
)
from chatkit.widgets import DynamicWidgetRoot
from flask import current_app

from flask_chatkit import RequestContext

from . import texts

log = logging.getLogger(__name__)

DEFAULT_WORD_DELAY = 0.03
WIDGET_ACTION = "demo.tell_more"
_CHUNK = re.compile(r"\S+\s*|\s+")


def setting(name: str, default: Any) -> Any:
    """An app config value when there is an app (there is, inside a request)."""
    try:
        return current_app.config.get(name, default)
    except RuntimeError:  # no app context: unit use of the server
        return default


def user_text(item: UserMessageItem | None) -> str:
    if item is None:
        return ""
    return " ".join(part.text for part in item.content if part.text).strip()


def chunks(text: str) -> list[str]:
    """Split text into word-sized deltas whose concatenation is exactly ``text``."""
    return _CHUNK.findall(text)


class DemoServer(ChatKitServer[RequestContext]):
    """A ChatKit server that needs no network, with an optional OpenAI mode."""

    # ------------------------------------------------------------------ respond
    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        text = user_text(input_user_message)
        if not thread.title and text:
            thread.title = texts.title_for(text)  # ChatKit saves it and sends thread.updated

        yield ProgressUpdateEvent(icon="sparkle", text="Reading the thread…")
        history = await self._history(thread, context)

        if _use_openai():
            async for event in self._openai_answer(thread, history, context):
                yield event
            return

        words = set(re.findall(r"[a-z]+", text.lower()))
        if "fail" in words:
            raise CustomStreamError("The demo was asked to fail.", allow_retry=True)
        if "workflow" in words:
            async for event in self._workflow(thread, context):
                yield event
        if "long" in words:
            answer = texts.long_answer(text)
        else:
            answer = texts.short_answer(
                text=text,
                user=_display_name(context),
                history=history,
                attachments=list(input_user_message.attachments) if input_user_message else [],
            )
        async for event in self.stream_text(thread, answer, context):
            yield event
        if "widget" in words:
            yield ThreadItemDoneEvent(item=self._widget_item(thread, context))

    # ------------------------------------------------------------------- action
    async def action(
        self,
        thread: ThreadMetadata,
        action: Action[str, Any],
        sender: WidgetItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        if action.type != WIDGET_ACTION:
            raise CustomStreamError(f"Unknown action {action.type!r}.", allow_retry=False)
        if sender is not None:  # the button has done its job: show it as used
            used = sender.model_copy(update={"widget": build_widget(pressed=True)})
            yield ThreadItemReplacedEvent(item=used)
        payload = action.payload if isinstance(action.payload, dict) else {}
        answer = texts.action_answer(str(payload.get("topic", "streaming")))
        async for event in self.stream_text(thread, answer, context):
            yield event

    # ------------------------------------------------------------------ helpers
    async def stream_text(
        self, thread: ThreadMetadata, text: str, context: RequestContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        """Stream ``text`` as one assistant message, a word at a time."""
        delay = float(setting("DEMO_WORD_DELAY", DEFAULT_WORD_DELAY))
        item = AssistantMessageItem(
            id=self.store.generate_item_id("message", thread, context),
            thread_id=thread.id,
            created_at=datetime.now(),
            content=[],
        )
        yield ThreadItemAddedEvent(item=item)
        yield ThreadItemUpdatedEvent(
            item_id=item.id,
            update=AssistantMessageContentPartAdded(
                content_index=0, content=AssistantMessageContent(text="")
            ),
        )
        for piece in chunks(text):
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            yield ThreadItemUpdatedEvent(
                item_id=item.id,
                update=AssistantMessageContentPartTextDelta(content_index=0, delta=piece),
            )
        final = AssistantMessageContent(text=text)
        yield ThreadItemUpdatedEvent(
            item_id=item.id,
            update=AssistantMessageContentPartDone(content_index=0, content=final),
        )
        yield ThreadItemDoneEvent(item=item.model_copy(update={"content": [final]}))

    async def _history(self, thread: ThreadMetadata, context: RequestContext) -> list[ThreadItem]:
        """Every item of the thread, oldest first (the new user message included)."""
        items: list[ThreadItem] = []
        after: str | None = None
        for _ in range(50):  # bounded: at most 5,000 items
            page = await self.store.load_thread_items(thread.id, after, 100, "asc", context)
            items.extend(page.data)
            if not page.has_more or not page.after:
                break
            after = page.after
        return items

    async def _workflow(
        self, thread: ThreadMetadata, context: RequestContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        delay = max(float(setting("DEMO_WORD_DELAY", DEFAULT_WORD_DELAY)) * 5, 0.0)
        titles = ["Read the message", "Look through the thread", "Draft the answer"]
        item = WorkflowItem(
            id=self.store.generate_item_id("workflow", thread, context),
            thread_id=thread.id,
            created_at=datetime.now(),
            workflow=Workflow(type="custom", tasks=[], expanded=True),
        )
        yield ThreadItemAddedEvent(item=item)
        tasks: list[CustomTask] = []
        for index, title in enumerate(titles):
            task = CustomTask(title=title, icon="check", status_indicator="loading")
            tasks.append(task)
            yield ThreadItemUpdatedEvent(
                item_id=item.id, update=WorkflowTaskAdded(task_index=index, task=task)
            )
            await asyncio.sleep(delay)
            done = task.model_copy(update={"status_indicator": "complete"})
            tasks[index] = done
            yield ThreadItemUpdatedEvent(
                item_id=item.id, update=WorkflowTaskUpdated(task_index=index, task=done)
            )
        workflow = Workflow(
            type="custom",
            tasks=list(tasks),
            summary=CustomSummary(title="Planned the answer", icon="check-circle"),
            expanded=False,
        )
        yield ThreadItemDoneEvent(item=item.model_copy(update={"workflow": workflow}))

    def _widget_item(self, thread: ThreadMetadata, context: RequestContext) -> WidgetItem:
        return WidgetItem(
            id=self.store.generate_item_id("message", thread, context),
            thread_id=thread.id,
            created_at=datetime.now(),
            widget=build_widget(pressed=False),
            copy_text="A demo widget with a button.",
        )

    async def _openai_answer(
        self, thread: ThreadMetadata, history: list[ThreadItem], context: RequestContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        """Answer through the Agents SDK; fall back to the offline text on any failure."""
        started = False
        try:
            from .openai_agent import agent_events  # lazy: needs openai-agents

            async for event in agent_events(self.store, thread, history, context):
                started = True
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never crash the demo on a model/network problem
            log.warning("OpenAI answer failed (%s); using the offline responder", exc)
            note = texts.fallback_note(exc, started)
            last = next((i for i in reversed(history) if isinstance(i, UserMessageItem)), None)
            answer = note + texts.short_answer(
                text=user_text(last),
                user=_display_name(context),
                history=history,
                attachments=list(last.attachments) if last else [],
            )
            async for event in self.stream_text(thread, answer, context):
                yield event


def build_widget(*, pressed: bool) -> DynamicWidgetRoot:
    """A Card with a Button wired to ``WIDGET_ACTION`` (built from plain data)."""
    button: dict[str, Any] = {
        "type": "Button",
        "id": "demo-button",
        "label": "Thanks!" if pressed else "Tell me more",
        "style": "primary",
        "disabled": pressed,
    }
    if not pressed:
        button["onClickAction"] = {"type": WIDGET_ACTION, "payload": {"topic": "streaming"}}
    return DynamicWidgetRoot.model_validate(
        {
            "type": "Card",
            "size": "sm",
            "children": [
                {"type": "Title", "value": "A ChatKit widget", "size": "sm"},
                {
                    "type": "Text",
                    "value": "Rendered by the server; the button calls action().",
                },
                button,
            ],
        }
    )


def _use_openai() -> bool:
    if not os.environ.get("OPENAI_API_KEY"):
        return False
    offline = setting("DEMO_OFFLINE", False)
    if isinstance(offline, str):
        offline = offline.strip().lower() in {"1", "true", "yes", "on"}
    return not offline


def _display_name(context: RequestContext) -> str:
    user = getattr(context, "user", None)
    name = getattr(user, "username", None)
    return str(name or getattr(context, "user_id", None) or "there")
