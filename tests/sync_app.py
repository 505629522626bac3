"""A Flask-SQLAlchemy app whose ``respond`` runs sync code through the helpers.

``gunicorn 'tests.sync_app:gunicorn_sync_app()'`` serves it; the message text
picks what ``respond`` does (``key=value`` words, see :class:`SyncServer`):

``words=N delay=S``           the plain word stream (a neighbour stream)
``op=work``                   one sync call: ``block=sleep:S`` / ``block=socket:PORT`` /
                              ``block=cpu:S`` (busy loop),
                              ``ctx=1`` (report current_user/g/request), ``db=1`` (insert
                              a Note, count the user's notes), ``fail=1`` (raise);
                              ``mode=helper`` (sync_to_async, default), ``mode=direct``
                              (called on the loop: the control) or ``mode=asgiref``
                              (asgiref's own default, ``thread_sensitive=True``) or
                              ``mode=to_thread`` (``asyncio.to_thread``)
``op=iter n=N delay=S``       a sync generator through sync_to_async_iter, ``time.sleep``
                              between words; ``hang_at=K hang=S`` blocks before word K;
                              ``marker=NAME`` makes its ``finally`` write
                              ``$CHATKIT_TEST_MARKER_DIR/NAME`` (and the hang
                              first touch ``NAME.hanging``)

Environment: ``CHATKIT_TEST_DB_URL`` (the app's and the ChatKit store's database),
``CHATKIT_TEST_MARKER_DIR``, plus any ``CHATKIT_*`` config key.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asgiref.sync
from chatkit.types import (
    AssistantMessageContent,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
)
from flask import Flask, g, jsonify, request
from flask_login import current_user
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_chatkit import SQLAlchemyStore, sync_to_async, sync_to_async_iter

from .apps import ScriptedServer, create_test_app
from .word_server import empty_reply, message_options, text_delta


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Note(db.Model):  # type: ignore[name-defined,misc]
    """The app's own model, used from inside ``respond``."""

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(String(200))


def blocking_socket_call(port: int) -> bytes:
    """Read a loopback server's whole answer (it answers late): a blocking socket call."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        while chunk := sock.recv(1024):
            data += chunk
    return data


def sync_work(options: dict[str, str]) -> str:
    """What a Flask team writes: blocking, sync, using Flask's globals and the ORM."""
    done = []
    kind, _, arg = options.get("block", "").partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
        done.append(f"slept={arg}")
    elif kind == "cpu":  # busy, never yields: holds whichever thread or hub runs it
        deadline = time.monotonic() + float(arg)
        while time.monotonic() < deadline:
            pass
        done.append(f"computed={arg}")
    elif kind == "socket":
        done.append(f"socket={blocking_socket_call(int(arg)).decode()}")
    if options.get("fail") == "1":
        raise RuntimeError("sync work failed on purpose")
    if options.get("ctx") == "1":
        done.append(f"user={current_user.id} g={g.marker} path={request.path}")
    if options.get("db") == "1":
        db.session.add(Note(user_id=current_user.id, text=options.get("note", "hello")))
        db.session.commit()
        count = db.session.scalar(
            select(func.count()).select_from(Note).where(Note.user_id == current_user.id)
        )
        done.append(f"notes={count}")
    return " ".join(done) or "done"


def slow_words(options: dict[str, str]) -> Iterator[str]:
    """A sync generator, like one built on the sync openai client's streaming."""
    count, delay = int(options.get("n", 3)), float(options.get("delay", 0))
    hang_at, hang = int(options.get("hang_at", -1)), float(options.get("hang", 0))
    marker = options.get("marker")
    seen = "exhausted"
    try:
        for index in range(count):
            if index == hang_at and marker:  # tests wait for this, not for a clock
                (Path(os.environ["CHATKIT_TEST_MARKER_DIR"]) / f"{marker}.hanging").touch()
            time.sleep(hang if index == hang_at else delay)
            yield f"w{index} "
    except BaseException as exc:  # GeneratorExit at the yield, GreenletExit in a sleep
        seen = type(exc).__name__
        raise
    finally:
        if marker:
            path = Path(os.environ["CHATKIT_TEST_MARKER_DIR"]) / marker
            path.write_text(f"{seen} {time.time()}")


class SyncServer(ScriptedServer):
    async def respond(
        self, thread: ThreadMetadata, input: UserMessageItem | None, context: Any
    ) -> AsyncIterator[ThreadStreamEvent]:
        options = message_options(input)
        op = options.get("op")
        if op is None:
            async for event in super().respond(thread, input, context):
                yield event
            return
        item = empty_reply(self, thread, context)
        yield ThreadItemAddedEvent(item=item)
        parts: list[str] = []
        try:
            if op == "iter":
                async for word in sync_to_async_iter(slow_words(options)):
                    parts.append(word)
                    yield text_delta(item.id, word)
            else:
                if options.get("mode") == "direct":
                    text = sync_work(options)  # the mistake the helper exists for
                elif options.get("mode") == "asgiref":  # asgiref's default, measured
                    text = await asgiref.sync.sync_to_async(sync_work)(options)
                elif options.get("mode") == "to_thread":  # the loop's native executor
                    text = await asyncio.to_thread(sync_work, options)
                else:
                    text = await sync_to_async(sync_work)(options)
                parts.append(text)
                yield text_delta(item.id, text)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        item.content = [AssistantMessageContent(text="".join(parts))]
        yield ThreadItemDoneEvent(item=item)


def create_sync_app(db_url: str, **config: Any) -> Flask:
    def store_on_app_db(app: Flask) -> SQLAlchemyStore:
        app.config["SQLALCHEMY_DATABASE_URI"] = db_url
        db.init_app(app)
        with app.app_context():
            db.create_all()
            return SQLAlchemyStore(db.engine)  # ChatKit's tables in the app's database

    app = create_test_app(store=store_on_app_db, server_cls=SyncServer, **config)

    @app.get("/_test/notes/<user_id>")
    def notes(user_id: str) -> Any:
        rows = db.session.scalars(select(Note).where(Note.user_id == user_id).order_by(Note.id))
        return jsonify(notes=[row.text for row in rows])

    return app


def gunicorn_sync_app() -> Flask:
    config: dict[str, Any] = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("CHATKIT_") and not key.startswith("CHATKIT_TEST_")
    }
    for key in ("CHATKIT_HEARTBEAT_SECONDS", "CHATKIT_CANCEL_TIMEOUT"):
        if key in config:
            config[key] = float(config[key])
    return create_sync_app(os.environ["CHATKIT_TEST_DB_URL"], **config)
