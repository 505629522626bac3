"""Attachment bytes on local disk, and the interface every blob storage follows.

:class:`DiskStorage` keeps one file per attachment in a directory, named by the
id only (ids must match ``^[A-Za-z0-9_-]{1,128}$``; the user's file name never
reaches the disk) and writes atomically (temp file + ``os.replace``; a failed or
oversized upload leaves nothing behind). Writes and ``fsync`` run off the gevent
hub, on two native threads per process (:class:`~flask_chatkit.storage.offload.OffloadPool`:
with a thread per upload, concurrent uploads' threads starved the hub and the event
loop of the GIL, and neighbour streams stalled; figures in the docs' benchmarks), in
batches of :data:`WRITE_BATCH` bytes so a large upload costs few hand-offs.
Temp files are named ``.upload-<pid>-<random>.part``: a worker killed mid-upload
leaves one behind, and the next :class:`DiskStorage` built over the directory
(every worker start) removes those whose process is gone.
Imports nothing of Flask.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

from .offload import OffloadPool

_WRITERS = OffloadPool(2)  # shared by every DiskStorage of the process

logger = logging.getLogger("flask_chatkit")

ATTACHMENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PART_RE = re.compile(r"^\.upload-(\d+)-[^/]*\.part$")
WRITE_BATCH = 1024 * 1024
# A .part file this old is stale even if its pid was reused by another process.
STALE_PART_SECONDS = 24 * 3600


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


@dataclass(frozen=True)
class BlobInfo:
    """What a blob storage holds for an id: its size and declared content type."""

    size: int
    content_type: str


@runtime_checkable
class PresigningStorage(AttachmentStorage, Protocol):
    """An object storage clients upload to and read from directly (presigned URLs)."""

    def save(  # the object's Content-Type is part of what is stored
        self, attachment_id: str, chunks: Iterable[bytes], max_bytes: int, content_type: str = ...
    ) -> int: ...

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` (with the fix) unless the storage is usable."""
        ...

    def ready(self) -> None:
        """:meth:`check` on first use (and after a failure); cheap afterwards."""
        ...

    def stat(self, attachment_id: str) -> BlobInfo | None: ...

    def presign_upload(
        self, attachment_id: str, content_type: str, size: int
    ) -> tuple[str, dict[str, str]]:
        """A short-lived PUT URL accepting exactly this type and size, and headers to send."""
        ...

    def presign_download(
        self, attachment_id: str, *, content_type: str, filename: str, inline: bool
    ) -> str: ...


class StorageUnavailable(Exception):
    """The blob storage cannot be reached or refuses us (retryable: a 503)."""


class StorageFull(Exception):
    """The blob storage has no room for these bytes (a 507); nothing was kept."""


# Write errors that mean "no room": a full disk, a quota, a file-size limit
# (RLIMIT_FSIZE gives EFBIG once SIGXFSZ is ignored, as gunicorn workers may).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# After a write found the disk full, the health check reports it full for this
# long unless a write succeeds first (each worker process knows its own writes).
FULL_REPORT_SECONDS = 60.0
# Less free space than this (for unprivileged users) is full for the health check.
MIN_FREE_BYTES = 1024 * 1024


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def sweep_partial_uploads(directory: str) -> list[str]:
    """Remove temp files of uploads whose process is gone (or that are very old)."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:  # missing or unusable: nothing to sweep (the health check names it)
        return removed
    now = time.time()
    for name in names:
        match = PART_RE.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        pid = int(match.group(1))
        try:
            stale = now - os.stat(path).st_mtime > STALE_PART_SECONDS
            if pid != os.getpid() and (stale or not _process_alive(pid)):
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    if removed:
        logger.info("removed %d interrupted upload(s) from %s", len(removed), directory)
    return removed


class DiskStorage:
    """One file per attachment in ``directory``, named by the (validated) id.

    Building one sweeps temp files left by interrupted uploads of dead processes.
    """

    def __init__(self, directory: str | os.PathLike[str], *, sweep: bool = True) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self._full_at: float | None = None  # monotonic time of the last "no room" write
        if sweep:
            sweep_partial_uploads(self.directory)

    def path(self, attachment_id: str) -> str:
        if not is_valid_attachment_id(attachment_id):
            raise ValueError(f"Invalid attachment id {attachment_id!r}")
        return os.path.join(self.directory, attachment_id)

    def save(self, attachment_id: str, chunks: Iterable[bytes], max_bytes: int) -> int:
        final = self.path(attachment_id)
        try:
            total = self._save(final, chunks, max_bytes)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                self._full_at = time.monotonic()
                logger.warning("attachment storage %s is full: %s", self.directory, exc)
                raise StorageFull(f"No room for the attachment in {self.directory}.") from None
            raise
        self._full_at = None
        return total

    def _save(self, final: str, chunks: Iterable[bytes], max_bytes: int) -> int:
        os.makedirs(self.directory, exist_ok=True)
        # The temp name contains dots, so it can never be mistaken for an id.
        fd, tmp = tempfile.mkstemp(
            dir=self.directory, prefix=f".upload-{os.getpid()}-", suffix=".part"
        )
        total = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                batch: list[bytes] = []
                pending = 0
                for chunk in chunks:  # read here: on the hub, socket reads cooperate
                    total += len(chunk)
                    if total > max_bytes:
                        raise AttachmentTooLarge(max_bytes)
                    batch.append(chunk)
                    pending += len(chunk)
                    if pending >= WRITE_BATCH:
                        _WRITERS.run(_write_all, out, batch)
                        batch, pending = [], 0
                _WRITERS.run(_finish_file, out, batch, tmp, final)
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
        full_at = self._full_at
        if full_at is not None and time.monotonic() - full_at < FULL_REPORT_SECONDS:
            raise StorageFull(f"attachment directory {self.directory} is full (a write failed)")
        stats = os.statvfs(self.directory)
        if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
            raise StorageFull(f"attachment directory {self.directory} is full")


def _write_all(out: IO[bytes], batch: list[bytes]) -> None:
    view = memoryview(b"".join(batch))
    while view:  # a raw (unbuffered) write may be partial
        written = out.write(view)
        view = view[written or 0 :]


def _finish_file(out: IO[bytes], batch: list[bytes], tmp: str, final: str) -> None:
    if batch:
        _write_all(out, batch)
    os.fsync(out.fileno())
    os.replace(tmp, final)
