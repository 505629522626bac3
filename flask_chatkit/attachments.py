"""Attachment files: where the bytes live, and the ChatKit ``AttachmentStore``.

Two layers:

* :class:`AttachmentStorage` — a tiny byte store keyed by attachment id
  (``save`` / ``open`` / ``delete`` / ``exists``). :class:`DiskStorage` keeps
  one file per attachment in ``CHATKIT_ATTACHMENTS_DIR``, named by the id only
  (ids must match ``^[A-Za-z0-9_-]{1,128}$``; the user's file name never reaches
  the disk) and writes atomically (temp file + ``os.replace``; a failed or
  oversized upload leaves nothing behind).
* :class:`FileAttachmentStore` — the ``chatkit.store.AttachmentStore`` ChatKit
  calls for ``attachments.create`` / ``attachments.delete``. It checks the MIME
  type (``CHATKIT_ALLOWED_MIME_TYPES``, 415) and the declared size
  (``CHATKIT_MAX_ATTACHMENT_BYTES``, 413), and answers with an upload
  descriptor pointing at this app's ``<prefix>/attachments/<id>/upload`` route
  (two-phase upload). Images get a ``preview_url`` served by
  ``<prefix>/attachments/<id>/content``. The declared size and the upload state
  are kept in the attachment's ``metadata`` (ChatKit never sends it to clients).

Object storage: implement the four methods of :class:`AttachmentStorage` and
pass it in; everything else (routes, limits, ownership) stays the same::

    class S3Storage:
        def save(self, attachment_id, chunks, max_bytes): ...  # multipart upload, abort on error
        def open(self, attachment_id): ...                     # a readable binary file object
        def delete(self, attachment_id): ...
        def exists(self, attachment_id): ...

    ChatKit(app, MyServer, attachment_store=FileAttachmentStore(S3Storage(bucket)))

Limits and allowed types default to the app's ``CHATKIT_*`` settings, read at
request time, so one ``FileAttachmentStore`` may serve several apps.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from chatkit.store import AttachmentStore, Store
from chatkit.types import (
    AttachmentCreateParams,
    AttachmentUploadDescriptor,
    FileAttachment,
    ImageAttachment,
)
from flask import Flask, current_app, has_app_context, url_for
from pydantic import AnyUrl

from .config import read_settings
from .storage.disk import (
    AttachmentStorage,
    DiskStorage,
    is_valid_attachment_id,
)
from .web.errors import ChatKitHTTPException

logger = logging.getLogger("flask_chatkit")

AnyAttachment = FileAttachment | ImageAttachment

MAX_NAME_LENGTH = 255
_CHUNK = 64 * 1024


# -- helpers shared with the routes ------------------------------------------


def normalize_mime(mime_type: str | None) -> str:
    return (mime_type or "").split(";", 1)[0].strip().lower()


def guess_mime(filename: str | None, declared: str | None) -> str:
    mime = normalize_mime(declared)
    if (not mime or mime == "application/octet-stream") and filename:
        mime = normalize_mime(mimetypes.guess_type(filename)[0]) or mime
    return mime or "application/octet-stream"


def mime_allowed(mime_type: str, allowed: Iterable[str]) -> bool:
    mime = normalize_mime(mime_type)
    if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", mime):
        return False
    major = mime.split("/", 1)[0]
    for pattern in allowed:
        pattern = normalize_mime(pattern)
        if pattern in (mime, "*/*") or pattern == f"{major}/*":
            return True
    return False


def safe_name(name: str | None) -> str:
    """A display/download name: no path, no control characters, bounded length."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    if base in ("", ".", ".."):
        return "attachment"
    return base[:MAX_NAME_LENGTH]


def is_image(mime_type: str) -> bool:
    return normalize_mime(mime_type).startswith("image/")


def is_uploaded(attachment: AnyAttachment) -> bool:
    """False only for a two-phase attachment whose bytes have not arrived yet.

    Attachments this module did not create (no ``uploaded`` key) count as uploaded.
    """
    metadata = attachment.metadata or {}
    return bool(metadata.get("uploaded", True))


def declared_size(attachment: AnyAttachment) -> int | None:
    size = (attachment.metadata or {}).get("size")
    return size if isinstance(size, int) else None


def content_url(attachment_id: str) -> str:
    return url_for("chatkit.attachment_content", attachment_id=attachment_id, _external=True)


def upload_url(attachment_id: str) -> str:
    return url_for("chatkit.attachment_upload", attachment_id=attachment_id, _external=True)


def build_attachment(
    attachment_id: str,
    name: str,
    mime_type: str,
    *,
    size: int,
    uploaded: bool,
    thread_id: str | None = None,
) -> AnyAttachment:
    """An Attachment for this app's routes (needs an app + request context for URLs)."""
    descriptor = None
    if not uploaded:
        descriptor = AttachmentUploadDescriptor(
            url=AnyUrl(upload_url(attachment_id)), method="POST", headers={}
        )
    fields: dict[str, Any] = {
        "id": attachment_id,
        "name": safe_name(name),
        "mime_type": normalize_mime(mime_type),
        "upload_descriptor": descriptor,
        "thread_id": thread_id,
        "metadata": {"size": size, "uploaded": uploaded},
    }
    if is_image(mime_type):
        return ImageAttachment(preview_url=AnyUrl(content_url(attachment_id)), **fields)
    return FileAttachment(**fields)


def mark_uploaded(attachment: AnyAttachment, size: int) -> AnyAttachment:
    metadata = {**(attachment.metadata or {}), "size": size, "uploaded": True}
    return attachment.model_copy(update={"upload_descriptor": None, "metadata": metadata})


def attachment_json(attachment: AnyAttachment) -> str:
    """Serialized like the SDK's responses (no ``metadata``, no nulls)."""
    return attachment.model_dump_json(
        by_alias=True, exclude_none=True, context={"exclude_metadata": True}
    )


# -- the ChatKit AttachmentStore ----------------------------------------------


class FileAttachmentStore(AttachmentStore[Any]):
    """ChatKit's attachment hooks on top of an :class:`AttachmentStorage`.

    ``storage`` defaults to :class:`DiskStorage` on the current app's
    ``CHATKIT_ATTACHMENTS_DIR``; ``max_bytes`` and ``allowed_mime_types``
    default to ``CHATKIT_MAX_ATTACHMENT_BYTES`` / ``CHATKIT_ALLOWED_MIME_TYPES``.
    ``store`` (the owner-scoped thread store) lets ``delete_attachment`` refuse
    another user's id on its own; without it the app's store is used.
    """

    def __init__(
        self,
        storage: AttachmentStorage | None = None,
        *,
        store: Store[Any] | None = None,
        max_bytes: int | None = None,
        allowed_mime_types: Sequence[str] | None = None,
    ) -> None:
        self._storage = storage
        self.store = store
        self._max_bytes = max_bytes
        self._allowed = tuple(allowed_mime_types) if allowed_mime_types is not None else None

    # Settings resolved at call time (inside a request or the loop thread,
    # where the copied contextvars make current_app visible).
    @property
    def storage(self) -> AttachmentStorage:
        if self._storage is not None:
            return self._storage
        return DiskStorage(current_app.extensions["chatkit"].settings.attachments_dir)

    @property
    def max_bytes(self) -> int:
        if self._max_bytes is not None:
            return self._max_bytes
        return int(current_app.extensions["chatkit"].settings.max_attachment_bytes)

    @property
    def allowed_mime_types(self) -> tuple[str, ...]:
        if self._allowed is not None:
            return self._allowed
        return tuple(current_app.extensions["chatkit"].settings.allowed_mime_types)

    def discard_files(self, attachment_ids: list[str]) -> None:
        """Remove stored files whose rows are gone (threads deleted or pruned)."""
        storage = self._storage
        if storage is None:
            return  # storage resolves per app at request time; nothing to resolve here
        for attachment_id in attachment_ids:
            try:
                storage.delete(attachment_id)
            except (OSError, ValueError):
                logger.warning("could not remove attachment file %s", attachment_id)

    def check_mime(self, mime_type: str) -> str:
        mime = normalize_mime(mime_type)
        if not mime_allowed(mime, self.allowed_mime_types):
            raise ChatKitHTTPException(415, f"Attachments of type {mime or '?'!r} are not allowed.")
        return mime

    def check_size(self, size: int) -> None:
        if size < 0:
            raise ChatKitHTTPException(400, "Attachment size must not be negative.")
        if size > self.max_bytes:
            raise ChatKitHTTPException(413, f"Attachment exceeds {self.max_bytes} bytes.")

    def generate_attachment_id(self, mime_type: str, context: Any) -> str:
        # The SDK default has 32 random bits; files are keyed by id alone, so
        # ids must not collide across users.
        return f"atc_{uuid.uuid4().hex}"

    async def create_attachment(self, input: AttachmentCreateParams, context: Any) -> AnyAttachment:
        mime = self.check_mime(input.mime_type)
        self.check_size(input.size)
        attachment_id = self.generate_attachment_id(mime, context)
        return build_attachment(attachment_id, input.name, mime, size=input.size, uploaded=False)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        store = self.store if self.store is not None else _app_store()
        if store is not None:  # NotFoundError (404) for an unknown or foreign id
            await store.load_attachment(attachment_id, context)
        if is_valid_attachment_id(attachment_id):
            await asyncio.to_thread(self.storage.delete, attachment_id)


def _app_store() -> Store[Any] | None:
    if not has_app_context():
        return None
    state = current_app.extensions.get("chatkit")
    return getattr(state, "store", None)


def default_attachment_store(app: Flask, store: Store[Any]) -> FileAttachmentStore:
    """What ``ChatKit`` uses when no ``attachment_store`` is given: files on disk."""
    return FileAttachmentStore(DiskStorage(read_settings(app).attachments_dir), store=store)
