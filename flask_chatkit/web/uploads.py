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
the bytes never pass through a worker.
"""

from __future__ import annotations

import contextvars
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
from ..storage.offload import cooperate
from .multipart import MultipartFile
from .observe import attachment_stored
from .response import url_rewriter

T = TypeVar("T")

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

    def store_body(self, attachment_id: str, chunks: Iterator[bytes], mime: str) -> int:
        limit = self.files.max_bytes
        try:
            return self.files.save_bytes(attachment_id, chunks, mime)
        except AttachmentTooLarge:
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


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK_SIZE)
        if not chunk:
            return
        cooperate()  # a fast body never blocks the read: let other streams run
        yield chunk


def _limit_multipart(limit: int) -> MultipartFile:
    """The body's ``file`` part, streamed; oversized bodies refused before and while read."""
    bound = limit + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > bound:
        raise ChatKitHTTPException(413, f"Attachment exceeds {limit} bytes.")
    request.max_content_length = bound  # enforced on chunked bodies too
    return MultipartFile(request.stream, request.content_type or "")


# -- routes -------------------------------------------------------------------


def direct_upload() -> Response:
    if request.method != "POST":
        raise method_not_allowed(request.method, "POST, OPTIONS")
    call = _Call()
    if request.mimetype != "multipart/form-data":
        raise ChatKitHTTPException(415, "Send the file as multipart/form-data in a 'file' field.")
    upload = _limit_multipart(call.files.max_bytes)
    mime = call.files.check_mime(guess_mime(upload.filename, upload.content_type))
    attachment_id = call.files.generate_attachment_id(mime, call.context)
    size = call.store_body(attachment_id, upload.chunks(), mime)
    attachment = build_attachment(
        attachment_id, upload.filename or "", mime, size=size, uploaded=True
    )
    call.save(attachment)
    return call.json(attachment)


def upload(attachment_id: str) -> Response:
    if request.method not in ("POST", "PUT"):
        raise method_not_allowed(request.method, "POST, PUT, OPTIONS")
    call = _Call()
    attachment = call.load(attachment_id)
    if is_uploaded(attachment) or attachment.upload_descriptor is None:
        raise already_uploaded(attachment_id)
    call.files.check_mime(attachment.mime_type)
    call.run(lambda: call.files.claim_upload(attachment, call.context))  # 409 if taken
    try:
        size = _receive(call, attachment)
        uploaded = mark_uploaded(attachment, size)
        if not call.run(lambda: call.files.complete_upload(uploaded, call.context)):
            raise already_uploaded(attachment_id)  # the row changed under us (deleted)
    except BaseException:
        call.run(lambda: call.files.release_upload(attachment_id, call.context))
        call.files.storage.delete(attachment_id)
        raise
    attachment_stored(attachment_id, size, call.context)
    return call.json(uploaded)


def _receive(call: _Call, attachment: AnyAttachment) -> int:
    """Stream the request body into storage; returns the size (400/413 on mismatch)."""
    attachment_id = attachment.id
    mime = normalize_mime(attachment.mime_type)
    limit = call.files.max_bytes
    expected = declared_size(attachment)
    if request.mimetype == "multipart/form-data":
        chunks = _limit_multipart(limit).chunks()
    else:
        if request.content_length is not None and request.content_length > limit:
            raise ChatKitHTTPException(413, f"Attachment exceeds {limit} bytes.")
        length = request.content_length
        if length is not None and expected is not None and length != expected:
            raise _size_mismatch(length, expected)
        request.max_content_length = limit
        chunks = _chunks(request.stream)
    size = call.store_body(attachment_id, chunks, mime)
    if expected is not None and size != expected:
        raise _size_mismatch(size, expected)  # the caller removes the bytes
    return size


def content(attachment_id: str) -> Response | WerkzeugResponse:
    if request.method not in ("GET", "HEAD"):
        raise method_not_allowed(request.method, "GET, HEAD, OPTIONS")
    call = _Call()
    attachment = call.load(attachment_id)
    if not is_uploaded(attachment):
        raise _not_found(attachment_id)
    mime = normalize_mime(attachment.mime_type)
    # SVG can carry script: offer it as a download (an <img> still renders it).
    inline = is_image(mime) and mime != "image/svg+xml"
    presigning = call.files.presigning
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
