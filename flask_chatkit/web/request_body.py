"""Reading, bounding and parsing a ChatKit request body: once, before ChatKit runs.

* **Read once.** Rate limiters (Flask-Limiter's ``exempt_when``/``cost``) and other
  ``before_request`` code may look at the request before the view: the bytes (or the
  413) are cached on ``g``, so the view sees the same body and nothing is read twice.
* **Bounded.** A body over ``CHATKIT_MAX_REQUEST_BYTES`` is a 413 before it is
  buffered. A body that would *parse* into pathologically many values is a 413 before
  it is parsed: a 4 MiB body of ``[{},{},…]`` is 1.4 M Python objects once built. The
  view counts the JSON values it would become (opening brackets and commas outside
  strings) and refuses more than :func:`max_json_values` allows for its size. The
  count is a few ``bytes.count`` calls for ordinary bodies; only a body over the budget
  is scanned again, slice by slice, leaving out what is inside strings.
* **In time.** The whole body must arrive within ``CHATKIT_BODY_TIMEOUT`` seconds, or
  the client gets 408 and the connection is closed: a client trickling a byte at a
  time would otherwise hold one of the worker's connections for as long as it likes,
  and a few dozen such sockets starve a gevent worker of its ``worker_connections``,
  health checks included (figures: docs, benchmarks). Under gevent the read runs
  inside a ``gevent.Timeout``: a real deadline on the whole body. Under threaded
  workers (gthread, sync) no other thread can interrupt a blocking read, so the
  deadline is checked between chunk reads and each socket wait is bounded by the
  time left (``gunicorn.socket``): a client that sends nothing is cut off in time,
  but one that keeps trickling bytes inside one chunk can overrun it by up to a
  chunk's worth of waits. There, put a buffering proxy in front (nginx's
  ``proxy_request_buffering on``; see docs/nginx.conf.example).
* **Parsed once.** ``ChatKitServer.process()`` builds ``TypeAdapter(ChatKitReq)`` on
  every call and parses the raw body again; the view parses with one cached adapter
  here and hands the parsed request to the SDK's handlers (``web/endpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from typing import Any

from chatkit.types import ChatKitReq
from flask import current_app, g, request
from pydantic import TypeAdapter, ValidationError

from ..errors import ChatKitHTTPException, bad_request

__all__ = [
    "MESSAGE_REQUEST_TYPES",
    "chatkit_request_type",
    "is_message_request",
    "parse_request",
    "request_body",
]

# -- read once, bounded --------------------------------------------------------
ENDPOINT = "chatkit.endpoint"
# The requests that send a user message to ``respond``.
MESSAGE_REQUEST_TYPES = frozenset({"threads.create", "threads.add_user_message"})


def _read_limited(limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without buffering it all,
    and (408) a body that has not arrived within ``timeout`` seconds."""
    length = request.content_length
    if length is not None and length > limit:
        raise ChatKitHTTPException(413, f"Request body exceeds {limit} bytes.")
    sock = request.environ.get("gunicorn.socket")
    try:
        if _gevent_patched():
            import gevent

            with gevent.Timeout(timeout, BodyTimeout):
                body = request.stream.read(limit + 1)
        else:
            body = _read_with_deadline(limit + 1, time.monotonic() + timeout, sock)
    except (BodyTimeout, TimeoutError):
        raise body_timeout(timeout, sock) from None
    if len(body) > limit:
        raise ChatKitHTTPException(413, f"Request body exceeds {limit} bytes.")
    return body


# Threaded workers read the body in chunks of this size, checking the deadline between them.
_BODY_CHUNK = 16 * 1024


class BodyTimeout(Exception):
    """The request body did not arrive in time (raised by ``gevent.Timeout``)."""


def _gevent_patched() -> bool:
    # Only a gevent worker patches the socket module; gevent.monkey is then imported.
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _read_with_deadline(size: int, deadline: float, sock: Any) -> bytes:
    """Up to ``size`` bytes, each socket wait bounded by the time left before ``deadline``."""
    # gunicorn's threaded workers hand the app the connection's socket.
    settable = callable(getattr(sock, "settimeout", None))
    previous = sock.gettimeout() if settable else None
    parts: list[bytes] = []
    got = 0
    try:
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BodyTimeout
            if settable:
                sock.settimeout(left)
            chunk = request.stream.read(min(_BODY_CHUNK, size - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    finally:
        if settable:
            sock.settimeout(previous)
    return b"".join(parts)


def body_timeout(timeout: float, sock: Any) -> ChatKitHTTPException:
    """The 408; the connection ends after it (:func:`end_connection`, once it is written)."""
    if sock is not None:
        g._chatkit_end_connection = sock
    return ChatKitHTTPException(
        408,
        f"The request body was not received within {timeout:g} seconds.",
        headers={"Connection": "close"},
    )


LINGER_SECONDS = 2.0


def end_connection(sock: Any) -> None:
    """End a connection whose body never arrived, after its 408 has been written.

    gunicorn drops an application's ``Connection`` header and, to reach the next
    request, would drain the rest of the body, waiting on the slow client again. So:
    FIN after the 408 (``SHUT_WR``), then read and drop what the client still sends
    for a moment (closing with unread bytes would answer with a reset, which can
    destroy the 408 before the client reads it), then shut the read side, so
    gunicorn's drain ends at once and it closes the connection.
    """
    with contextlib.suppress(OSError, AttributeError):  # already gone / not a socket
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.25)
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break  # the client closed its side
            except TimeoutError:
                continue
        sock.shutdown(socket.SHUT_RD)


def request_body(limit: int, timeout: float | None = None) -> bytes:
    """The body of the current request, read once (bounded by ``limit`` bytes and
    ``timeout`` seconds, default ``CHATKIT_BODY_TIMEOUT``) and cached."""
    cached = g.get("_chatkit_body")
    if cached is None:
        if timeout is None:
            timeout = current_app.extensions["chatkit"].settings.body_timeout
        try:
            cached = _read_limited(limit, timeout)
        except ChatKitHTTPException as exc:
            cached = exc
        g._chatkit_body = cached
    if isinstance(cached, ChatKitHTTPException):
        raise cached
    assert isinstance(cached, bytes)
    return cached


def chatkit_request_type() -> str | None:
    """The ``type`` of the ChatKit request being served (e.g. ``"threads.create"``).

    None outside a ``POST`` to the ChatKit endpoint, or when the body is not a
    readable ChatKit request (the endpoint then answers 400/413 as usual). Safe to
    call from ``before_request`` hooks such as Flask-Limiter's ``exempt_when``.
    """
    if request.endpoint != ENDPOINT or request.method != "POST":
        return None
    if request.mimetype != "application/json":
        return None
    limit = current_app.extensions["chatkit"].settings.max_request_bytes
    try:
        body = request_body(limit)
        check_json_shape(body)  # never build a pathological body here either (413 later)
        payload = json.loads(body)
    except (ChatKitHTTPException, ValueError, RecursionError):
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def is_message_request() -> bool:
    """True when the current request sends a user message (``threads.create`` or
    ``threads.add_user_message``): what a per-user message limit should count."""
    return chatkit_request_type() in MESSAGE_REQUEST_TYPES


# -- the shape of the JSON ----------------------------------------------------
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


REQUEST_ADAPTER: TypeAdapter[ChatKitReq] = TypeAdapter(ChatKitReq)


def parse_request(body: bytes) -> ChatKitReq:
    """Validate a raw body into a ChatKit request, or raise a 400 with a useful message.

    A body that would parse into too many values is a 413 before it is parsed.
    """
    check_json_shape(body)
    try:
        return REQUEST_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc), "invalid_request") from None
    except RecursionError:
        raise bad_request("Request JSON is nested too deeply.", "invalid_request") from None


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return "Malformed JSON body."
    if any(e["type"] in ("union_tag_invalid", "union_tag_not_found") for e in errors):
        return "Unknown or missing ChatKit request 'type'."
    parts = []
    for error in errors[:3]:
        location = ".".join(str(p) for p in error["loc"][1:]) or "body"
        parts.append(f"{location}: {error['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "Invalid ChatKit request: " + "; ".join(parts) + more


def serialize_request(request: ChatKitReq) -> bytes:
    return REQUEST_ADAPTER.dump_json(request, by_alias=True)
