"""Attachment routes on the ChatKit blueprint: direct upload, two-phase upload, content.

``POST <prefix>/attachments``                    direct upload (multipart ``file``)
``POST|PUT <prefix>/attachments/<id>/upload``    two-phase target (multipart or raw body)
``GET <prefix>/attachments/<id>/content``        the bytes, owner only

Every route resolves the context inside the request (401 when not logged in),
reads and writes attachment rows through the owner-scoped store on the loop
thread (so another user's id is a 404), and streams bodies to storage in
chunks, refusing (413) as soon as ``CHATKIT_MAX_ATTACHMENT_BYTES`` is passed.
A two-phase upload first claims the row (one conditional UPDATE): of two
uploads to one id the first wins and the second gets a 409 straight away.
On object storage ``content`` answers 302 to a short-lived presigned GET, so
the bytes never pass through a worker; an attachment uploaded straight to the
bucket is checked there (and recorded as uploaded) on its first read, so it
serves before its message is sent, as on disk.

**Pending bytes.** One user's uploaded-but-unsent bytes (uploads done or under
way, and on object storage also declared-but-unconfirmed ones) are bounded by
``CHATKIT_MAX_PENDING_ATTACHMENT_BYTES``: past it, 413 naming the limit. Sending
(the row gets its thread) or deleting frees the room. Two concurrent uploads of
one user may together pass it by at most one attachment (the sum is read, then
written): a bound on abuse, not an exact ledger.

**Minimum upload rate** (under gevent workers). An upload body must arrive at
:data:`UPLOAD_MIN_BYTES_PER_SECOND` on average, after a grace of
:data:`UPLOAD_GRACE_SECONDS`: the first ``n`` bytes are due by
``start + grace + n / rate``. Each read waits at most until its bytes are due; a
body that falls behind gets 408 and the connection is closed (read side shut, so
the server does not wait for the rest). At 8 KiB/s the default 20 MiB limit
allows ~43 minutes; a client sending a byte now and then holds a connection
(one of ``worker_connections``) for at most the grace period plus a few seconds.
Other worker classes have no cheap way to interrupt a blocked read: put a
buffering proxy in front of them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any, TypeVar

from chatkit.store import NotFoundError
from flask import Blueprint, Response, redirect, request, send_file
from werkzeug.wrappers import Response as WerkzeugResponse

from ..attachments import (
    AnyAttachment,
    FileAttachmentStore,
    already_uploaded,
    attachment_json,
    build_attachment,
    declared_size,
    guess_mime,
    is_image,
    is_uploaded,
    mark_uploaded,
    normalize_mime,
)
from ..errors import ChatKitHTTPException, method_not_allowed
from ..state import ChatKitState, get_state
from ..storage.disk import AttachmentTooLarge, is_valid_attachment_id
from ..storage.offload import cooperate, on_gevent_hub
from .multipart import MultipartFile
from .observe import attachment_stored
from .response import url_rewriter

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")

# The minimum upload rate (see the module docstring).
UPLOAD_MIN_BYTES_PER_SECOND = 8 * 1024
UPLOAD_GRACE_SECONDS = 10.0

CHUNK_SIZE = 64 * 1024
# Room for multipart boundaries and part headers on top of the file itself.
MULTIPART_OVERHEAD = 16 * 1024
CONTENT_MAX_AGE = 3600
# Served bytes are user content: never let a browser run them as a page.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"


def register_attachment_routes(bp: Blueprint, methods: list[str]) -> None:
    """Add the attachment routes to the ChatKit blueprint."""
    bp.add_url_rule("/attachments", "attachment_direct", direct_upload, methods=methods)
    bp.add_url_rule(
        "/attachments/<attachment_id>/upload", "attachment_upload", upload, methods=methods
    )
    bp.add_url_rule(
        "/attachments/<attachment_id>/content", "attachment_content", content, methods=methods
    )


# -- plumbing -----------------------------------------------------------------


class _Call:
    """The per-request pieces every route needs."""

    def __init__(self) -> None:
        state = get_state()
        files = state.attachment_store
        if not isinstance(files, FileAttachmentStore):
            raise ChatKitHTTPException(404, "Attachment uploads are not served by this app.")
        self.state: ChatKitState = state
        self.files: FileAttachmentStore = files
        state.check_setup()
        self.context: Any = state.context_loader(request, {})
        state.ensure_schema()

    def run(self, make_coro: Callable[[], Awaitable[T]]) -> T:
        return self.state.loop_thread.run(make_coro, contextvars.copy_context())

    def load(self, attachment_id: str) -> AnyAttachment:
        if not is_valid_attachment_id(attachment_id):
            raise _not_found(attachment_id)
        try:
            attachment: AnyAttachment = self.run(
                lambda: self.state.store.load_attachment(attachment_id, self.context)
            )
        except NotFoundError:
            raise _not_found(attachment_id) from None
        return attachment

    def save(self, attachment: AnyAttachment) -> None:
        """Save the row; if that fails the stored bytes are removed too."""
        try:
            self.run(lambda: self.state.store.save_attachment(attachment, self.context))
        except BaseException:
            self.files.storage.delete(attachment.id)
            raise
        attachment_stored(attachment.id, declared_size(attachment), self.context)

    def pending_room(self, excluding: str | None = None) -> int | None:
        """Bytes this user may still upload before CHATKIT_MAX_PENDING_ATTACHMENT_BYTES."""
        used = self.run(lambda: self.files.pending_bytes(self.context, excluding))
        if used is None:
            return None
        return self.state.settings.max_pending_attachment_bytes - used

    def pending_too_large(self) -> ChatKitHTTPException:
        quota = self.state.settings.max_pending_attachment_bytes
        return ChatKitHTTPException(
            413,
            f"Your attachments not sent yet would exceed {quota} bytes "
            "(CHATKIT_MAX_PENDING_ATTACHMENT_BYTES): send or delete some first.",
        )

    def store_body(
        self, attachment_id: str, chunks: Iterator[bytes], mime: str, room: int | None = None
    ) -> int:
        limit = self.files.max_bytes
        bound = limit if room is None else min(limit, room)
        try:
            return self.files.save_bytes(attachment_id, chunks, mime, max_bytes=bound)
        except AttachmentTooLarge:
            if bound < limit:
                raise self.pending_too_large() from None
            raise ChatKitHTTPException(413, f"Attachment exceeds {limit} bytes.") from None

    def json(self, attachment: AnyAttachment) -> Response:
        body = url_rewriter(self.state.settings)(attachment_json(attachment).encode())
        return Response(body, mimetype="application/json")


def _not_found(attachment_id: str) -> ChatKitHTTPException:
    shown = attachment_id if is_valid_attachment_id(attachment_id) else "?"
    return ChatKitHTTPException(404, f"Attachment {shown} not found.")


def _size_mismatch(size: int, expected: int) -> ChatKitHTTPException:
    return ChatKitHTTPException(
        400, f"Uploaded {size} bytes but the attachment declared {expected}."
    )


class _TooSlow(ChatKitHTTPException):
    def __init__(self) -> None:
        super().__init__(
            408,
            f"The upload arrived slower than {UPLOAD_MIN_BYTES_PER_SECOND} bytes per second.",
        )


class MinRateStream:
    """``request.stream`` with the minimum upload rate (module docstring): each read
    waits at most until its bytes are due, else :class:`_TooSlow` (408)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._start = time.monotonic()
        self._received = 0

    def read(self, size: int = -1) -> bytes:
        if not on_gevent_hub():  # a blocked read cannot be interrupted here
            return self._stream.read(size)
        from gevent import Timeout

        due = self._start + UPLOAD_GRACE_SECONDS
        due += (self._received + max(size, 0)) / UPLOAD_MIN_BYTES_PER_SECOND
        timer = Timeout(max(due - time.monotonic(), 0.001))
        timer.start()
        try:
            data = self._stream.read(size)
        except Timeout as exc:
            if exc is not timer:
                raise
            raise _TooSlow() from None
        finally:
            timer.close()
        self._received += len(data)
        return data


def _close_after(response: Response) -> Response:
    """Close the connection once ``response`` is sent: the body's rest is never read."""
    sock = request.environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):

        def shut() -> None:
            with contextlib.suppress(OSError):  # the server's drain of the body sees its end
                sock.shutdown(socket.SHUT_RD)

        response.call_on_close(shut)
    response.headers["Connection"] = "close"
    return response


def _upload_stream() -> IO[bytes]:
    return MinRateStream(request.stream)  # type: ignore[return-value]


def _chunks(stream: IO[bytes], refresh: Callable[[], None] | None = None) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK_SIZE)
        if not chunk:
            return
        cooperate()  # a fast body never blocks the read: let other streams run
        if refresh is not None:
            refresh()
        yield chunk


def _limit_multipart(limit: int) -> MultipartFile:
    """The body's ``file`` part, streamed; oversized bodies refused before and while read."""
    bound = limit + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > bound:
        raise ChatKitHTTPException(413, f"Attachment exceeds {limit} bytes.")
    request.max_content_length = bound  # enforced on chunked bodies too
    return MultipartFile(_upload_stream(), request.content_type or "")


def _timed_out(handler: Callable[[], Response]) -> Response:
    """Run a route; a body that fell below the minimum rate gets 408 and a closed connection."""
    try:
        return handler()
    except _TooSlow as exc:
        from ..errors import http_exception_response

        return _close_after(http_exception_response(exc))


# -- routes -------------------------------------------------------------------


def direct_upload() -> Response:
    return _timed_out(_direct_upload)


def _direct_upload() -> Response:
    if request.method != "POST":
        raise method_not_allowed(request.method, "POST, OPTIONS")
    call = _Call()
    if request.mimetype != "multipart/form-data":
        raise ChatKitHTTPException(415, "Send the file as multipart/form-data in a 'file' field.")
    room = call.pending_room()
    if room is not None and room <= 0:
        raise call.pending_too_large()
    upload = _limit_multipart(call.files.max_bytes)
    mime = call.files.check_mime(guess_mime(upload.filename, upload.content_type))
    attachment_id = call.files.generate_attachment_id(mime, call.context)
    size = call.store_body(attachment_id, upload.chunks(), mime, room)
    attachment = build_attachment(
        attachment_id, upload.filename or "", mime, size=size, uploaded=True
    )
    call.save(attachment)
    return call.json(attachment)


def upload(attachment_id: str) -> Response:
    """The two-phase upload target (multipart ``file`` or the raw body).

    The body must keep the minimum upload rate of the module docstring
    (:data:`UPLOAD_MIN_BYTES_PER_SECOND` on average after :data:`UPLOAD_GRACE_SECONDS`;
    else 408 and the connection is closed). The upload holds a claim on the row,
    refreshed while bytes arrive; if the final write fails the claim is given back
    (or, if even that fails, it goes stale after ``CLAIM_STALE_SECONDS``), so the
    503 "try again" lets the client upload again.
    """
    return _timed_out(lambda: _upload(attachment_id))


def _upload(attachment_id: str) -> Response:
    if request.method not in ("POST", "PUT"):
        raise method_not_allowed(request.method, "POST, PUT, OPTIONS")
    call = _Call()
    attachment = call.load(attachment_id)
    if is_uploaded(attachment) or attachment.upload_descriptor is None:
        raise already_uploaded(attachment_id)
    call.files.check_mime(attachment.mime_type)
    room = call.pending_room(excluding=attachment_id)
    expected = declared_size(attachment)
    if room is not None and expected is not None and expected > room:
        raise call.pending_too_large()
    claim = _Claim(call, attachment_id)
    claim.token = call.run(lambda: call.files.claim_upload(attachment, call.context))  # 409
    claim.held = True
    try:
        size = _receive(call, attachment, claim.refresh, room)
        uploaded = mark_uploaded(attachment, size)
        if not call.run(
            lambda: call.files.complete_upload(uploaded, call.context, token=claim.token)
        ):
            raise already_uploaded(attachment_id)  # the row changed under us (deleted)
    except BaseException:
        claim.give_back()
        raise
    attachment_stored(attachment_id, size, call.context)
    return call.json(uploaded)


class _Claim:
    """This upload's claim on the row: refreshed while bytes arrive, given back on failure."""

    def __init__(self, call: _Call, attachment_id: str) -> None:
        from ..storage.sql import CLAIM_REFRESH_SECONDS

        self.call = call
        self.attachment_id = attachment_id
        self.token: str | None = None  # None with stores that keep no claims
        self.held = False
        self._every = CLAIM_REFRESH_SECONDS
        self._refreshed = time.monotonic()

    def refresh(self) -> None:
        if self.token is None or time.monotonic() - self._refreshed < self._every:
            return
        call, token = self.call, self.token
        self.token = call.run(
            lambda: call.files.refresh_upload(self.attachment_id, call.context, token)
        )
        self._refreshed = time.monotonic()
        if self.token is None:  # taken over (we were stale): stop writing its bytes
            self.held = False
            raise already_uploaded(self.attachment_id)

    def give_back(self) -> None:
        """Release the claim and remove our bytes; never hides the original error."""
        call, token = self.call, self.token
        if not self.held:
            return  # nothing held (or lost to another upload: its bytes, not ours)
        try:
            released = call.run(
                lambda: call.files.release_upload(self.attachment_id, call.context, token)
            )
        except Exception as exc:  # e.g. the database is down: the claim goes stale
            logger.warning(
                "upload claim of %s not released (it expires): %s", self.attachment_id, exc
            )
            return
        if released:
            try:
                call.files.storage.delete(self.attachment_id)
            except Exception as exc:  # the pending row still leads to the bytes
                logger.warning("upload bytes of %s not removed: %s", self.attachment_id, exc)


def _receive(
    call: _Call,
    attachment: AnyAttachment,
    refresh: Callable[[], None] | None = None,
    room: int | None = None,
) -> int:
    """Stream the request body into storage; returns the size (400/413 on mismatch)."""
    attachment_id = attachment.id
    mime = normalize_mime(attachment.mime_type)
    limit = call.files.max_bytes
    expected = declared_size(attachment)
    if request.mimetype == "multipart/form-data":
        chunks = _refreshing(_limit_multipart(limit).chunks(), refresh)
    else:
        if request.content_length is not None and request.content_length > limit:
            raise ChatKitHTTPException(413, f"Attachment exceeds {limit} bytes.")
        length = request.content_length
        if length is not None and expected is not None and length != expected:
            raise _size_mismatch(length, expected)
        # One byte of room: a body of exactly ``limit`` bytes is read to its end (the
        # storage's own bound answers our JSON 413 for a longer chunked body), where
        # Werkzeug's bound refused it with its generic 413.
        request.max_content_length = limit + 1
        chunks = _chunks(_upload_stream(), refresh)
    size = call.store_body(attachment_id, chunks, mime, room)
    if expected is not None and size != expected:
        raise _size_mismatch(size, expected)  # the caller removes the bytes
    return size


def _refreshing(chunks: Iterator[bytes], refresh: Callable[[], None] | None) -> Iterator[bytes]:
    for chunk in chunks:
        if refresh is not None:
            refresh()
        yield chunk


def content(attachment_id: str) -> Response | WerkzeugResponse:
    if request.method not in ("GET", "HEAD"):
        raise method_not_allowed(request.method, "GET, HEAD, OPTIONS")
    call = _Call()
    attachment = call.load(attachment_id)
    presigning = call.files.presigning
    if not is_uploaded(attachment):
        if presigning is None:
            raise _not_found(attachment_id)
        # Uploaded straight to the bucket: check the object, record it, then serve it.
        try:
            call.run(lambda: call.files.confirm_uploaded(attachment, call.context))
        except ChatKitHTTPException as exc:
            if exc.code != 409:
                raise
            raise _not_found(attachment_id) from None
    mime = normalize_mime(attachment.mime_type)
    # SVG can carry script: offer it as a download (an <img> still renders it).
    inline = is_image(mime) and mime != "image/svg+xml"
    if presigning is not None:
        url = presigning.presign_download(
            attachment_id,
            content_type=mime,
            filename=attachment.name or "attachment",
            inline=inline,
        )
        response = redirect(url, code=302)
        response.headers["Cache-Control"] = "private, no-store"  # the URL expires soon
        return response
    try:
        stream = call.files.storage.open(attachment_id)
    except FileNotFoundError:
        raise _not_found(attachment_id) from None
    response = send_file(
        stream,
        mimetype=mime,
        as_attachment=not inline,
        download_name=attachment.name or "attachment",
        conditional=True,
        etag=attachment_id,
        max_age=CONTENT_MAX_AGE,
    )
    response.headers["Cache-Control"] = f"private, max-age={CONTENT_MAX_AGE}"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response
