"""Stream the ``file`` part of a ``multipart/form-data`` body without spooling it.

``request.files`` parses the whole body first and spools files over 500 KB to a
temp file on local disk, on the gevent hub: a 20 MiB upload is written twice,
once where nobody wanted it, and the limits only apply afterwards. Werkzeug's
event-based :class:`~werkzeug.sansio.multipart.MultipartDecoder` lets the
upload routes read the part's headers, then hand its bytes chunk by chunk to
the blob storage (which enforces the size limit as they arrive).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import (
    NEED_DATA,
    Data,
    Epilogue,
    Event,
    File,
    MultipartDecoder,
)

from ..errors import ChatKitHTTPException
from ..storage.offload import cooperate

READ_SIZE = 64 * 1024
MAX_FIELD_BYTES = 64 * 1024  # other (non-file) fields are read and dropped
MAX_PARTS = 16


class MultipartFile:
    """The first part named ``field`` that carries a file name, read lazily."""

    def __init__(self, stream: IO[bytes], content_type: str, field: str = "file") -> None:
        boundary = parse_options_header(content_type)[1].get("boundary", "")
        if not boundary:
            raise ChatKitHTTPException(400, "The multipart body has no boundary.")
        self._stream = stream
        self._decoder = MultipartDecoder(boundary.encode(), max_parts=MAX_PARTS)
        self._field = field
        self.filename = ""
        self.content_type = ""
        self._find_file()

    def _events(self) -> Iterator[Event]:
        try:
            while True:
                event = self._decoder.next_event()
                if event is NEED_DATA:
                    chunk = self._stream.read(READ_SIZE)
                    self._decoder.receive_data(chunk or None)
                    cooperate()
                    continue
                yield event
                if isinstance(event, Epilogue):
                    return
        except ValueError:  # cut short or malformed
            raise ChatKitHTTPException(400, "The multipart body is incomplete.") from None

    def _find_file(self) -> None:
        skipped = 0
        for event in self._events():
            if isinstance(event, File) and event.name == self._field and event.filename:
                self.filename = event.filename
                self.content_type = event.headers.get("Content-Type", "")
                return
            if isinstance(event, Data):
                skipped += len(event.data)
                if skipped > MAX_FIELD_BYTES:
                    raise ChatKitHTTPException(413, "The multipart form fields are too large.")
        raise ChatKitHTTPException(400, "Expected a multipart form with a 'file' field.")

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes as they arrive (the rest of the body is left unread)."""
        for event in self._events():
            if isinstance(event, Data):
                if event.data:
                    yield event.data
                if not event.more_data:
                    return
        raise ChatKitHTTPException(400, "The multipart body is incomplete.")
