"""The attachments table of ``SQLAlchemyStore``: upload claims and orphans.

Two columns beyond the SDK's payload make uploads safe on many workers and machines:

* ``upload_state``: ``pending`` (created, bytes not there yet), ``uploading``
  (one upload holds the claim), ``done``; NULL for rows saved by other code.
  Claiming is one conditional ``UPDATE … WHERE upload_state = 'pending'``, so of
  two concurrent uploads exactly one wins and the other gets a 409 — no
  read-then-write window.
* ``created_at``: when the row was first saved, so ``prune`` can reclaim
  attachments never linked to a thread (created, or uploaded but never sent).

A row's ``thread_id`` is never cleared once set: the SDK links an attachment to
its thread when the message is sent, and a late save of the unlinked copy must
not undo that. Imports nothing of Flask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from chatkit.types import Attachment
from sqlalchemy import Connection, Engine, Table, delete, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from .schema import db_time

T = TypeVar("T")

PENDING, UPLOADING, DONE = "pending", "uploading", "done"
_ADDED_COLUMNS = {"created_at": "TIMESTAMP", "upload_state": "VARCHAR(16)"}


def upload_state_of(attachment: Attachment) -> str | None:
    """The state implied by a payload this package wrote (``metadata.uploaded``)."""
    metadata = attachment.metadata or {}
    if "uploaded" not in metadata:
        return None
    return DONE if metadata.get("uploaded") else PENDING


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class AttachmentRows:
    """Mixed into ``SQLAlchemyStore``: everything about the attachments table."""

    attachments: Table
    engine: Engine
    on_attachments_deleted: Callable[[list[str]], None] | None

    if TYPE_CHECKING:

        def _tx(self, write: bool = False) -> AbstractContextManager[Connection]: ...

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

        def owner_key(self, context: Any) -> str: ...

        def _attachments_removed(self, attachment_ids: list[str]) -> None: ...

    # -- schema ---------------------------------------------------------------
    def _add_attachment_columns(self, conn: Connection) -> None:
        """Tables made before these columns existed get them (nullable, no rewrite)."""
        present = {c["name"] for c in inspect(conn).get_columns(self.attachments.name)}
        for name, sql_type in _ADDED_COLUMNS.items():
            if name not in present:
                conn.execute(
                    text(f"ALTER TABLE {self.attachments.name} ADD COLUMN {name} {sql_type}")
                )

    # -- rows -----------------------------------------------------------------
    def _save_attachment(self, owner: str, attachment: Attachment) -> None:
        a = self.attachments
        payload = attachment.model_dump(mode="json")
        with self._tx(write=True) as conn:
            row = conn.execute(
                select(a.c.thread_id, a.c.upload_state)
                .where(a.c.owner == owner, a.c.id == attachment.id)
                .with_for_update()
            ).first()
            if row is None:
                values = {
                    "owner": owner,
                    "id": attachment.id,
                    "thread_id": attachment.thread_id,
                    "payload": payload,
                    "created_at": _utcnow(),
                    "upload_state": upload_state_of(attachment),
                }
                try:
                    with conn.begin_nested():
                        conn.execute(insert(a).values(**values))
                    return
                except IntegrityError:  # saved concurrently: update that row below
                    row = conn.execute(
                        select(a.c.thread_id, a.c.upload_state).where(
                            a.c.owner == owner, a.c.id == attachment.id
                        )
                    ).first()
            thread_id = attachment.thread_id
            if thread_id is None and row is not None and row.thread_id is not None:
                thread_id = row.thread_id  # never unlink
                payload["thread_id"] = thread_id
            changes: dict[str, Any] = {"thread_id": thread_id, "payload": payload}
            if row is not None and row.upload_state in (None, DONE):
                changes["upload_state"] = upload_state_of(attachment) or row.upload_state
            if row is not None and row.upload_state == DONE:
                # Bytes arrived: a stale copy saying "not uploaded" must not reopen it.
                payload["metadata"] = {**(payload.get("metadata") or {}), "uploaded": True}
                payload["upload_descriptor"] = None
                changes["upload_state"] = DONE
            conn.execute(
                update(a).where(a.c.owner == owner, a.c.id == attachment.id).values(**changes)
            )

    def _set_upload_state(
        self, owner: str, attachment_id: str, before: str, after: str, payload: Any = None
    ) -> bool:
        a = self.attachments
        values: dict[str, Any] = {"upload_state": after}
        if payload is not None:
            values["payload"] = payload
        with self._tx(write=True) as conn:
            result = conn.execute(
                update(a)
                .where(a.c.owner == owner, a.c.id == attachment_id, a.c.upload_state == before)
                .values(**values)
            )
        return bool(result.rowcount == 1)

    # -- async API used by flask_chatkit.attachments ---------------------------
    async def claim_attachment_upload(self, attachment_id: str, context: Any) -> bool:
        """Take the right to upload this attachment's bytes; False if taken or done."""
        owner = self.owner_key(context)
        return await self._run(self._set_upload_state, owner, attachment_id, PENDING, UPLOADING)

    async def release_attachment_upload(self, attachment_id: str, context: Any) -> None:
        """Give a failed upload's claim back, so the client may try again."""
        owner = self.owner_key(context)
        await self._run(self._set_upload_state, owner, attachment_id, UPLOADING, PENDING)

    async def complete_attachment_upload(
        self, attachment: Attachment, context: Any, *, claimed: bool = True
    ) -> bool:
        """Store the uploaded row, only if this caller still holds the claim.

        ``claimed=False`` completes straight from ``pending`` (bytes put into the
        bucket with a presigned URL, checked by the caller).
        """
        owner = self.owner_key(context)
        before = UPLOADING if claimed else PENDING
        payload = attachment.model_dump(mode="json")
        return await self._run(self._set_upload_state, owner, attachment.id, before, DONE, payload)

    # -- orphans ----------------------------------------------------------------
    def _orphan_attachments(self, conn: Connection, cutoff: datetime) -> Iterator[tuple[str, str]]:
        a = self.attachments
        # NULL created_at: rows from before the column existed, of unknown age.
        old = a.c.created_at.is_(None) | (a.c.created_at < db_time(cutoff))
        query = select(a.c.owner, a.c.id).where(a.c.thread_id.is_(None), old).order_by(a.c.seq)
        for owner, attachment_id in conn.execute(query):
            yield str(owner), str(attachment_id)

    def prune_orphan_attachments(
        self, older_than: datetime, *, dry_run: bool = False
    ) -> list[tuple[str, str]]:
        """Remove attachment rows never linked to a thread and created before ``older_than``.

        Returns ``(owner, attachment_id)`` pairs; their bytes are removed through
        ``on_attachments_deleted`` after the commit. ``dry_run`` only lists them.
        """
        a = self.attachments
        with self._tx(write=not dry_run) as conn:
            orphans = list(self._orphan_attachments(conn, older_than))
            if dry_run:
                return orphans
            for owner, attachment_id in orphans:
                conn.execute(
                    delete(a).where(
                        a.c.owner == owner, a.c.id == attachment_id, a.c.thread_id.is_(None)
                    )
                )
        self._attachments_removed([attachment_id for _, attachment_id in orphans])
        return orphans
