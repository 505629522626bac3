"""Attachment bytes on local disk, and the interface every blob storage follows.

:class:`DiskStorage` keeps one file per attachment in a directory, named by the
id only (ids must match ``^[A-Za-z0-9_-]{1,128}$``; the user's file name never
reaches the disk) and writes atomically (temp file + ``os.replace``; a failed or
oversized upload leaves nothing behind). Imports nothing of Flask.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable
from typing import IO, Protocol, runtime_checkable

ATTACHMENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class AttachmentTooLarge(Exception):
    """The bytes written exceeded ``max_bytes``; nothing was kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"Attachment exceeds {max_bytes} bytes.")
        self.max_bytes = max_bytes


def is_valid_attachment_id(attachment_id: str) -> bool:
    return bool(ATTACHMENT_ID_RE.fullmatch(attachment_id))


@runtime_checkable
class AttachmentStorage(Protocol):
    """Where attachment bytes live, keyed by attachment id.

    A storage may also define ``check() -> None``: a cheap probe the health
    route calls, raising when the storage is unreachable. Without it the
    health route calls ``exists()`` on an id that is never stored.
    """

    def save(self, attachment_id: str, chunks: Iterable[bytes], max_bytes: int) -> int:
        """Store all of ``chunks`` under the id and return the byte count.

        Must be all-or-nothing: on any error, or once more than ``max_bytes``
        arrive (raise :class:`AttachmentTooLarge`), nothing is left stored.
        """
        ...

    def open(self, attachment_id: str) -> IO[bytes]:
        """A readable binary file object; ``FileNotFoundError`` when missing."""
        ...

    def delete(self, attachment_id: str) -> None:
        """Remove the bytes; a missing id is not an error."""
        ...

    def exists(self, attachment_id: str) -> bool: ...


class DiskStorage:
    """One file per attachment in ``directory``, named by the (validated) id."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.path.abspath(os.fspath(directory))

    def path(self, attachment_id: str) -> str:
        if not is_valid_attachment_id(attachment_id):
            raise ValueError(f"Invalid attachment id {attachment_id!r}")
        return os.path.join(self.directory, attachment_id)

    def save(self, attachment_id: str, chunks: Iterable[bytes], max_bytes: int) -> int:
        final = self.path(attachment_id)
        os.makedirs(self.directory, exist_ok=True)
        # The temp name contains dots, so it can never be mistaken for an id.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=".part")
        total = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    total += len(chunk)
                    if total > max_bytes:
                        raise AttachmentTooLarge(max_bytes)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return total

    def open(self, attachment_id: str) -> IO[bytes]:
        return open(self.path(attachment_id), "rb")

    def delete(self, attachment_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(attachment_id))

    def exists(self, attachment_id: str) -> bool:
        return os.path.isfile(self.path(attachment_id))

    def check(self) -> None:
        """For the health route: the directory exists (or can be made) and is writable."""
        os.makedirs(self.directory, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(f"attachment directory {self.directory} is not writable")
