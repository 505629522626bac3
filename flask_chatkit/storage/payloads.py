"""The JSON ``payload`` column of the store's rows <-> ChatKit's pydantic models.

Imports nothing of Flask.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from chatkit.types import Attachment, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter

_THREAD_FIELDS = frozenset(ThreadMetadata.model_fields)


@lru_cache(maxsize=1)
def item_adapter() -> TypeAdapter[ThreadItem]:
    return TypeAdapter(ThreadItem)


@lru_cache(maxsize=1)
def attachment_adapter() -> TypeAdapter[Attachment]:
    return TypeAdapter(Attachment)


def thread_payload(thread: ThreadMetadata) -> dict[str, Any]:
    # Only ThreadMetadata's own fields: a full Thread's items are rows of their own.
    return thread.model_dump(mode="json", include=set(_THREAD_FIELDS))
