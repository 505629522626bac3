"""``thread.created`` reaches the client only once the new thread is stored.

ChatKit's ``threads.create`` saves the thread, yields ``thread.created``, and only
then stores the user message; ``SQLAlchemyStore`` writes a new thread together
with that first item (so a failure or cancel in between leaves no empty thread).
Sent at once, ``thread.created`` would hand the client an id that nobody can read
yet (measured: 3 of 30 immediate ``threads.get_by_id`` got 404), or — if storing
the message then failed — an id that never comes to exist.

So the view holds ``thread.created`` back until the next event: ChatKit yields
that one (``thread.item.done`` of the user message) right after the message is
stored, and with it the thread. If the stream fails first, the client gets a
plain HTTP error and never the id; if it ends first, the held event goes out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


async def hold_until_stored(result: Any) -> AsyncIterator[bytes]:
    """A ``threads.create`` StreamingResult whose first event waits for the next one."""
    # StreamingResult only re-yields its generator: iterate that (one hop less).
    source = getattr(result, "json_events", result)
    held: bytes | None = None
    waiting = True
    async for chunk in source:
        if waiting:  # thread.created: not yet
            waiting, held = False, chunk
            continue
        if held is not None:  # the user message is stored: both go out back to back
            yield held  # (still one event each, so the stream's event count stays true)
            held = None
        yield chunk
    if held is not None:  # the stream ended right after thread.created
        yield held
