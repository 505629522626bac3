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

Object storage: ``CHATKIT_ATTACHMENTS_URL = "s3://bucket/prefix"`` selects
:class:`~flask_chatkit.storage.s3.S3Storage`. Any storage that also offers
presigned URLs (:class:`~flask_chatkit.storage.disk.PresigningStorage`) gets
two-phase uploads straight to the bucket: the descriptor is a presigned ``PUT``
for the declared type and size, and the first message naming the attachment
checks the object (409 until it is there; a mismatching object is deleted).

URLs are never stored absolute: rows and items keep ``chatkit-app:///…`` paths
relative to the blueprint, made absolute as responses are served
(made absolute when served, by :mod:`flask_chatkit.web.response`).

Limits and allowed types default to the app's ``CHATKIT_*`` settings, read at
request time, so one ``FileAttachmentStore`` may serve several apps.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import threading
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
from flask import Flask, current_app, has_app_context
from pydantic import AnyUrl

from .config import Settings, read_settings
from .errors import ChatKitHTTPException
from .storage.disk import (
    AttachmentStorage,
    DiskStorage,
    PresigningStorage,
    StorageUnavailable,
    is_valid_attachment_id,
)

# Attachments (and the messages that carry them) are stored with URLs relative to
# the blueprint; each response makes them absolute on a trusted base
# (web/response.py), so a forged Host header never reaches the database and a new
# domain needs no data migration.
APP_URL = "chatkit-app:///"


def content_url(attachment_id: str) -> str:
    return f"{APP_URL}attachments/{attachment_id}/content"


def upload_url(attachment_id: str) -> str:
    return f"{APP_URL}attachments/{attachment_id}/upload"


logger = logging.getLogger("flask_chatkit")

AnyAttachment = FileAttachment | ImageAttachment

MAX_NAME_LENGTH = 255


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


def build_attachment(
    attachment_id: str,
    name: str,
    mime_type: str,
    *,
    size: int,
    uploaded: bool,
    thread_id: str | None = None,
    descriptor: AttachmentUploadDescriptor | None = None,
) -> AnyAttachment:
    """An Attachment for this app's routes; pending ones upload to our route by default."""
    if not uploaded and descriptor is None:
        descriptor = AttachmentUploadDescriptor(
            url=AnyUrl(upload_url(attachment_id)), method="POST", headers={}
        )
    fields: dict[str, Any] = {
        "id": attachment_id,
        "name": safe_name(name),
        "mime_type": normalize_mime(mime_type),
        "upload_descriptor": None if uploaded else descriptor,
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

    ``storage`` defaults to the current app's (``CHATKIT_ATTACHMENTS_URL`` or
    ``CHATKIT_ATTACHMENTS_DIR``); ``max_bytes`` and ``allowed_mime_types``
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
        return storage_for(current_app.extensions["chatkit"].settings)

    @property
    def presigning(self) -> PresigningStorage | None:
        """The storage, when clients upload to and read from it directly."""
        storage = self.storage
        return storage if isinstance(storage, PresigningStorage) else None

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

    def _owner_store(self) -> Store[Any] | None:
        return self.store if self.store is not None else _app_store()

    def discard_files(self, attachment_ids: list[str]) -> None:
        """Remove stored files whose rows are gone (threads deleted or pruned)."""
        storage = self._storage
        if storage is None:
            return  # storage resolves per app at request time; nothing to resolve here
        for attachment_id in attachment_ids:
            try:
                storage.delete(attachment_id)
            except (OSError, ValueError, StorageUnavailable):
                logger.warning("could not remove attachment file %s", attachment_id)

    def save_bytes(self, attachment_id: str, chunks: Iterable[bytes], mime_type: str) -> int:
        """Stream ``chunks`` into storage (AttachmentTooLarge past the limit)."""
        presigning = self.presigning
        if presigning is not None:
            return presigning.save(attachment_id, chunks, self.max_bytes, content_type=mime_type)
        return self.storage.save(attachment_id, chunks, self.max_bytes)

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
        descriptor = None
        presigning = self.presigning
        if presigning is not None:  # the bytes go straight to the bucket
            await asyncio.to_thread(presigning.ready)  # 503 now, not a failed PUT later
            url, headers = presigning.presign_upload(attachment_id, mime, input.size)
            descriptor = AttachmentUploadDescriptor(url=AnyUrl(url), method="PUT", headers=headers)
        return build_attachment(
            attachment_id, input.name, mime, size=input.size, uploaded=False, descriptor=descriptor
        )

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        store = self._owner_store()
        if store is not None:  # NotFoundError (404) for an unknown or foreign id
            await store.load_attachment(attachment_id, context)
        if is_valid_attachment_id(attachment_id):
            await asyncio.to_thread(self.storage.delete, attachment_id)

    # -- upload claims: first upload wins, the second gets a 409 ----------------
    async def claim_upload(self, attachment: AnyAttachment, context: Any) -> None:
        """Take the right to upload ``attachment``'s bytes, or raise 409."""
        store = self._owner_store()
        claim = getattr(store, "claim_attachment_upload", None)
        if callable(claim):
            if not await claim(attachment.id, context):
                raise already_uploaded(attachment.id)
            return
        if is_uploaded(attachment) or attachment.upload_descriptor is None:
            raise already_uploaded(attachment.id)  # stores without claims: best effort

    async def release_upload(self, attachment_id: str, context: Any) -> None:
        release = getattr(self._owner_store(), "release_attachment_upload", None)
        if callable(release):
            await release(attachment_id, context)

    async def complete_upload(
        self, attachment: AnyAttachment, context: Any, *, claimed: bool = True
    ) -> bool:
        """Record the bytes as uploaded; False when another upload got there first."""
        store = self._owner_store()
        complete = getattr(store, "complete_attachment_upload", None)
        if callable(complete):
            return bool(await complete(attachment, context, claimed=claimed))
        if store is not None:
            await store.save_attachment(attachment, context)
        return True

    async def confirm_uploaded(self, attachment: AnyAttachment, context: Any) -> None:
        """Before a message may carry ``attachment``: 409 unless its bytes are stored.

        On a presigning storage the client put the bytes in the bucket itself:
        the object must exist with the declared size and type; a mismatching
        object is deleted (the client may PUT again while its URL is valid).
        """
        if is_uploaded(attachment):
            return
        presigning = self.presigning
        if presigning is None or attachment.upload_descriptor is None:
            raise not_uploaded_yet(attachment.id)
        info = await asyncio.to_thread(presigning.stat, attachment.id)
        if info is None:
            raise not_uploaded_yet(attachment.id)
        expected = declared_size(attachment)
        mime = normalize_mime(attachment.mime_type)
        if info.size != expected or normalize_mime(info.content_type) != mime:
            await asyncio.to_thread(presigning.delete, attachment.id)
            raise ChatKitHTTPException(
                409,
                f"Attachment {attachment.id} was uploaded as {info.size} bytes of "
                f"{normalize_mime(info.content_type) or '?'!r}, not the declared {expected} "
                f"bytes of {mime!r}; it was discarded, upload it again.",
            )
        if not await self.complete_upload(
            mark_uploaded(attachment, info.size), context, claimed=False
        ):
            # Another request confirmed it (fine) or an upload through our route holds it.
            current = await self._reload(attachment.id, context)
            if current is None or not is_uploaded(current):
                raise not_uploaded_yet(attachment.id)

    async def _reload(self, attachment_id: str, context: Any) -> AnyAttachment | None:
        store = self._owner_store()
        if store is None:
            return None
        loaded: AnyAttachment = await store.load_attachment(attachment_id, context)
        return loaded


def already_uploaded(attachment_id: str) -> ChatKitHTTPException:
    return ChatKitHTTPException(409, f"Attachment {attachment_id} was already uploaded.")


def not_uploaded_yet(attachment_id: str) -> ChatKitHTTPException:
    return ChatKitHTTPException(409, f"Attachment {attachment_id} has not been uploaded yet.")


def _app_store() -> Store[Any] | None:
    if not has_app_context():
        return None
    state = current_app.extensions.get("chatkit")
    return getattr(state, "store", None)


_storages: dict[tuple[str | None, str], AttachmentStorage] = {}
_storages_lock = threading.Lock()


def storage_for(settings: Settings) -> AttachmentStorage:
    """The blob storage the settings name (one per process and location)."""
    key = (settings.attachments_url, settings.attachments_dir)
    storage = _storages.get(key)
    if storage is None:
        with _storages_lock:
            storage = _storages.get(key)
            if storage is None:
                storage = _storages[key] = build_storage(settings)
    return storage


def build_storage(settings: Settings) -> AttachmentStorage:
    """S3 for ``CHATKIT_ATTACHMENTS_URL = s3://…``, else files in ``CHATKIT_ATTACHMENTS_DIR``."""
    if settings.attachments_url:
        from .storage.s3 import S3Storage

        return S3Storage(settings.attachments_url)
    return DiskStorage(settings.attachments_dir)


def default_attachment_store(app: Flask, store: Store[Any]) -> FileAttachmentStore:
    """What ``ChatKit`` uses when no ``attachment_store`` is given: S3 or disk per config."""
    return FileAttachmentStore(build_storage(read_settings(app)), store=store)
