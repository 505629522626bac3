"""``gunicorn 'tests.hub_loop_app:gunicorn_app()'``: where the loop runs, and what views see.

``spin=S`` in a message makes ``respond`` send "spinning", spin on
``await asyncio.sleep(0)`` for S seconds (the loop always has a callback ready
meanwhile), then send "spun". ``fetch=HOST:PORT`` makes ``respond`` fetch
``/_test/ping`` there over an asyncio socket and send the body as its one delta.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from typing import Any

from asgiref.sync import async_to_sync
from chatkit.types import (
    AssistantMessageContent,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    UserMessageItem,
)
from flask import Flask, jsonify, request

from flask_chatkit.bridge.native import native_thread_id

from .apps import create_test_app
from .word_server import WordServer, empty_reply, message_options, text_delta


class SpinningServer(WordServer):
    async def respond(self, thread: Any, input: UserMessageItem | None, context: Any) -> Any:
        options = message_options(input)
        if options.get("fetch"):  # asyncio socket I/O on the loop: GET /_test/ping here
            host, _, port = options["fetch"].partition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /_test/ping HTTP/1.0\r\nHost: test\r\n\r\n")
            await writer.drain()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            item = empty_reply(self, thread, context)
            yield ThreadItemAddedEvent(item=item)
            yield text_delta(item.id, answer.split(b"\r\n\r\n", 1)[1].decode().strip())
            return
        spin = float(options.get("spin", 0))
        if not spin:
            async for event in super().respond(thread, input, context):
                yield event
            return
        item = empty_reply(self, thread, context)
        yield ThreadItemAddedEvent(item=item)
        yield text_delta(item.id, "spinning ")
        until = time.monotonic() + spin
        while time.monotonic() < until:
            await asyncio.sleep(0)  # always a callback ready: the loop never waits
        yield text_delta(item.id, "spun")
        item.content = [AssistantMessageContent(text="spinning spun")]
        yield ThreadItemDoneEvent(item=item)


async def _answer() -> int:
    await asyncio.sleep(0.001)
    return 42


async def _own_loop_throughout(seconds: float) -> bool:
    """Wait ``seconds`` in steps; whether each step still saw its own loop running."""
    loop = asyncio.get_running_loop()
    steps = 10
    seen = []
    for _ in range(steps):
        await asyncio.sleep(seconds / steps)  # reads the running loop before each wait
        seen.append(asyncio.get_running_loop() is loop)
    return all(seen)


def gunicorn_app() -> Flask:
    # The built-in SQLAlchemyStore (CHATKIT_DATABASE_URL): its reads answer inline.
    url = os.environ["CHATKIT_DATABASE_URL"]
    loop = os.environ.get("CHATKIT_LOOP", "hub")
    app = create_test_app(server_cls=SpinningServer, CHATKIT_DATABASE_URL=url, CHATKIT_LOOP=loop)

    @app.get("/_test/loop")
    def loop_thread() -> Any:
        state = app.extensions["chatkit"]

        async def where() -> int:
            return native_thread_id()

        loop_id = state.loop_thread.run(where, contextvars.copy_context(), timeout=30)
        return jsonify(same_thread=loop_id == native_thread_id())

    @app.get("/_test/views")
    def views() -> Any:
        running = asyncio._get_running_loop()
        return jsonify(
            running_loop=running is not None,
            asyncio_run=asyncio.run(_answer()),
            async_to_sync=async_to_sync(_answer)(),
        )

    @app.get("/_test/nested")
    def nested() -> Any:
        # An asyncio loop of the view's own, waiting while the worker's loop has work.
        seconds = float(request.args.get("seconds", "0.5"))
        return jsonify(
            asyncio_run=asyncio.run(_own_loop_throughout(seconds)),
            async_to_sync=async_to_sync(_own_loop_throughout)(seconds),
        )

    @app.get("/_test/ping")
    def ping() -> Any:
        return jsonify(ok=True)

    return app
