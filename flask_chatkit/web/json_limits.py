"""Refuse pathologically shaped JSON before building it, and cap ``metadata``.

A 4 MiB body of ``[{},{},…]`` is 1.4 M Python objects once parsed: ~25x its
size in memory, for seconds of CPU on the worker's hub. The size limit alone
does not bound that, so before parsing the view counts the JSON values a body
would become (opening brackets and commas outside strings) and refuses more
than :func:`max_json_values` allows for its size. The count is a few
``bytes.count`` calls for ordinary bodies; only a body over the budget is
scanned again, slice by slice, leaving out what is inside strings (commas in a
long text are not values). Peak memory for any body within
``CHATKIT_MAX_REQUEST_BYTES`` stays under 10x its size (tests/test_json_limits.py).
"""

from __future__ import annotations

from typing import Any

import pydantic_core

from .errors import ChatKitHTTPException

# Every body may hold this many values; beyond it, one value per this many bytes.
BASE_JSON_VALUES = 10_000
BYTES_PER_JSON_VALUE = 24

# The body is re-scanned in slices of this size, so no copy holds more than one.
_SLICE = 64 * 1024


def max_json_values(size: int) -> int:
    return BASE_JSON_VALUES + size // BYTES_PER_JSON_VALUE


def _count_values(data: bytes) -> int:
    # Each object and array opens with a bracket; each further member follows a comma.
    return data.count(b"{") + data.count(b"[") + data.count(b",")


def check_json_shape(body: bytes) -> None:
    """413 when ``body`` would parse into more values than its size allows."""
    budget = max_json_values(len(body))
    if _count_values(body) <= budget:
        return
    values = _count_values_outside_strings(body)
    if values > budget:
        raise ChatKitHTTPException(
            413,
            f"Request JSON holds too many values ({values}; at most {budget} "
            f"for {len(body)} bytes).",
        )


def _count_values_outside_strings(body: bytes) -> int:
    # Without escaped backslashes and escaped quotes, every remaining '"' opens
    # or closes a string, so quote parity says what is inside one. (A stray
    # backslash outside a string is a JSON error: the parser stops there.)
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    values = 0
    outside = True
    for start in range(0, len(text), _SLICE):
        parts = text[start : start + _SLICE].split(b'"')
        values += _count_values(b"".join(parts[0 if outside else 1 :: 2]))
        if len(parts) % 2 == 0:  # an odd number of quotes: the next slice starts flipped
            outside = not outside
    return values


def check_metadata_size(metadata: dict[str, Any], limit: int) -> None:
    """413 when the request's ``metadata``, serialized, exceeds ``limit`` bytes."""
    if not metadata:
        return
    size = len(pydantic_core.to_json(metadata))
    if size > limit:
        raise ChatKitHTTPException(
            413, f"Request metadata is {size} bytes serialized; at most {limit} are allowed."
        )
