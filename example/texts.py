"""The offline responder's words: deterministic markdown built from the thread."""

from __future__ import annotations

from collections.abc import Sequence

from chatkit.types import Attachment, ThreadItem, UserMessageItem

TITLE_LENGTH = 40

LONG_TOPICS = [
    "Flask answers each request synchronously, so a ChatKit stream needs a bridge.",
    "The bridge runs one asyncio loop per worker in a native thread.",
    "Each streamed event crosses back to the greenlet that owns the response.",
    "When the browser goes away, the next write fails and the task is cancelled.",
    "ChatKit then saves the partial answer, which is why a stopped reply survives a reload.",
    "Heartbeat comments keep proxies from closing a quiet stream.",
    "Threads, items and attachments live in SQL, scoped to their owner.",
    "Several gunicorn workers, or several servers, can share one database.",
]


def title_for(text: str) -> str:
    words = " ".join(text.split())
    if len(words) <= TITLE_LENGTH:
        return words
    return words[: TITLE_LENGTH - 1].rstrip() + "…"


def _quote(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _user_texts(history: Sequence[ThreadItem]) -> list[str]:
    out = []
    for item in history:
        if isinstance(item, UserMessageItem):
            out.append(" ".join(p.text for p in item.content if p.text).strip())
    return out


def short_answer(
    *, text: str, user: str, history: Sequence[ThreadItem], attachments: Sequence[Attachment]
) -> str:
    said = _user_texts(history)
    count = max(len(said), 1)
    lines = [f"Hello **{user}**! You wrote: “{_quote(text) or '(no text)'}”.", ""]
    plural = "message" if count == 1 else "messages"
    lines.append(f"You said {count} {plural} so far in this thread.")
    if len(said) >= 2:
        lines.append(f"Before this one you said: “{_quote(said[-2])}”.")
    if attachments:
        lines.append("")
        lines.append(f"You attached {len(attachments)} file(s):")
        for attachment in attachments:
            lines.append(f"- `{attachment.name}` ({attachment.mime_type})")
    lines += [
        "",
        "This is the offline demo responder. Try a message containing "
        "*long*, *workflow*, *widget* or *fail*.",
    ]
    return "\n".join(lines)


def long_answer(text: str) -> str:
    """About 200 words, in eight paragraphs (for stop/cancel tests)."""
    paragraphs = [f"Here is a long answer to “{_quote(text, 40)}”, streamed word by word."]
    for number, topic in enumerate(LONG_TOPICS, start=1):
        paragraphs.append(
            f"{number}. {topic} This paragraph is part of a deliberately long reply, "
            "so there is time to press stop."
        )
    paragraphs.append("That is the end of the long answer.")
    return "\n\n".join(paragraphs)


def action_answer(topic: str) -> str:
    return (
        f"You pressed the widget's button (topic: *{_quote(topic, 40)}*). "
        "This reply was streamed by `action()`, the server's handler for "
        "`threads.custom_action`."
    )


def fallback_note(exc: BaseException, started: bool) -> str:
    where = "while answering" if started else "before answering"
    return f"_(The OpenAI call failed {where}: {type(exc).__name__}; offline answer follows.)_\n\n"
