"""``GET <prefix>/health`` for load balancers: no auth, no user data, no table scans.

Checks, each bounded in time:

* ``event_loop``  the worker's ChatKit event loop runs a no-op;
* ``database``    the store's ``ping()`` (``SELECT 1`` for ``SQLAlchemyStore``),
                  when the store has one;
* ``attachments`` the blob storage's ``check()`` (or ``exists()`` of an id never
                  stored), when the app serves attachments with a blob storage.

200 ``{"status": "ok", "checks": {...}}`` when all pass; 503 with the same
``checks`` (each ``"ok"``, ``"timeout"``, ``"unavailable"`` or ``"skipped"``) and
the JSON error shape naming the failing checks otherwise. The reasons go to the
log, not to the (unauthenticated) caller. Off with ``CHATKIT_HEALTH = False``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flask import Response, request

from ..errors import method_not_allowed
from ..state import ChatKitState, get_state

logger = logging.getLogger("flask_chatkit")

LOOP_TIMEOUT = 1.0  # seconds for the event loop to run a no-op
CHECK_TIMEOUT = 2.0  # seconds for the database or the storage to answer
SENTINEL_ID = "chatkit-health-check"  # valid id shape; never generated (ids start "atc_")


def health_view() -> Response:
    if request.method not in ("GET", "HEAD"):
        raise method_not_allowed(request.method, "GET, HEAD")
    state = get_state()
    checks: dict[str, str] = {}
    probes = _probes(state)
    context = contextvars.copy_context()
    try:
        state.loop_thread.run(_noop, context, timeout=LOOP_TIMEOUT)
        checks["event_loop"] = "ok"
    except TimeoutError:
        logger.warning("health: the ChatKit event loop did not answer in %ss", LOOP_TIMEOUT)
        checks["event_loop"] = "timeout"
    if checks["event_loop"] == "ok" and probes:
        try:
            results = state.loop_thread.run(
                lambda: _run_probes(probes), context, timeout=CHECK_TIMEOUT + LOOP_TIMEOUT
            )
        except TimeoutError:  # the loop stalled after answering the no-op
            results = dict.fromkeys(probes, "timeout")
        checks.update(results)
    else:
        checks.update(dict.fromkeys(probes, "skipped"))
    failing = [name for name, result in checks.items() if result not in ("ok", "skipped")]
    body: dict[str, Any] = {"status": "ok" if not failing else "unavailable", "checks": checks}
    if failing:
        body["error"] = {
            "code": "service_unavailable",
            "message": "Failing health checks: " + ", ".join(failing) + ".",
        }
    response = Response(
        json.dumps(body), status=503 if failing else 200, mimetype="application/json"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def _noop() -> None:
    return None


def _probes(state: ChatKitState) -> dict[str, Callable[[], Awaitable[None]]]:
    """The async checks this app's store and attachment storage support."""
    probes: dict[str, Callable[[], Awaitable[None]]] = {}
    ping = getattr(state.store, "ping", None)
    if callable(ping):
        probes["database"] = ping
    # Resolved here, in the request: the default storage depends on the app's settings.
    try:
        storage = getattr(state.attachment_store, "storage", None)
    except Exception as exc:  # a storage that cannot even be built is unreachable
        logger.warning("health: attachment storage unavailable: %s", exc)
        probes["attachments"] = _failing(exc)
        return probes
    if storage is not None:
        check = getattr(storage, "check", None)
        if not callable(check):

            def check() -> None:
                storage.exists(SENTINEL_ID)

        probes["attachments"] = lambda: asyncio.to_thread(check)
    return probes


def _failing(exc: Exception) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        raise exc

    return probe


async def _run_probes(probes: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, str]:
    names = list(probes)
    outcomes = await asyncio.gather(*(_probe(name, probes[name]) for name in names))
    return dict(zip(names, outcomes, strict=True))


async def _probe(name: str, probe: Callable[[], Awaitable[None]]) -> str:
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT)
    except asyncio.TimeoutError:
        logger.warning("health: %s did not answer within %ss", name, CHECK_TIMEOUT)
        return "timeout"
    except Exception as exc:
        logger.warning("health: %s unavailable: %s", name, exc)
        return "unavailable"
    return "ok"
