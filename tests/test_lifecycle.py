"""Unit tests of the deploy plan and the open-stream registry (bridge/lifecycle.py).

The real SIGTERM / HUP / max_requests paths run against gunicorn in
tests/reliability/test_deploys.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from flask_chatkit.bridge.lifecycle import STOP_MARGIN, StopPlan, find_gunicorn_worker
from flask_chatkit.bridge.loop import OpenStreams

from .gunicorn import ROOT
from .helpers import sqlite_url


@pytest.mark.parametrize(
    ("graceful", "cancel", "after", "fits"),
    [
        (30.0, 10.0, 30.0 - 10.0 - STOP_MARGIN, True),  # gunicorn's and our defaults
        (5.0, 1.0, 5.0 - 1.0 - STOP_MARGIN, True),
        (5.0, 10.0, 0.0, False),  # cannot fit: cancel as soon as the stop begins
        (0.5, 0.1, 0.0, False),
    ],
)
def test_stop_plan(graceful: float, cancel: float, after: float, fits: bool) -> None:
    plan = StopPlan(graceful, cancel)
    assert plan.cancel_after == pytest.approx(after)
    assert plan.fits is fits


def test_not_a_gunicorn_worker() -> None:
    assert find_gunicorn_worker() is None


async def _reply(log: list[str]) -> None:
    """Stands in for a pump task: it saves on cancel, like ChatKit does."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await asyncio.sleep(0.01)  # the store's round trip
        log.append("saved")
        raise


def test_cancel_all_cancels_and_waits_for_the_saves() -> None:
    async def scenario() -> tuple[tuple[int, int], list[str], int]:
        streams, log = OpenStreams(), []
        tasks = [asyncio.create_task(_reply(log)) for _ in range(3)]
        for task in tasks:
            streams.add(task)
        await asyncio.sleep(0)
        result = await streams.cancel_all(timeout=5)
        return result, log, len(streams)

    result, log, left = asyncio.run(scenario())
    assert result == (3, 0)
    assert log == ["saved"] * 3
    assert left == 0  # finished tasks leave the registry


def test_cancel_all_reports_streams_that_do_not_finish_in_time() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(1)  # a save slower than the budget

    async def scenario() -> tuple[int, int]:
        streams = OpenStreams()
        streams.add(asyncio.create_task(stubborn()))
        await asyncio.sleep(0)
        return await streams.cancel_all(timeout=0.05)

    assert asyncio.run(scenario()) == (1, 1)


def test_a_stream_started_while_closing_is_cancelled_after_its_first_step() -> None:
    async def scenario() -> list[str]:
        streams, log = OpenStreams(), []
        await streams.cancel_all(timeout=1)
        task = asyncio.create_task(_reply(log))
        streams.add(task)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        return log

    # Cancelled only once it runs, so its own cancel handling (the save) still happens.
    assert asyncio.run(scenario()) == ["saved"]


# A plain script (what `flask run` or a CLI command is to the extension: no gunicorn
# worker to hook) that leaves a reply streaming and returns normally.
_EXIT_MID_REPLY = """
import sys
from tests.helpers import login_as, sqlite_app
from tests.http_client import create_request, read_until_delta

app = sqlite_app(__import__("pathlib").Path(sys.argv[1]), CHATKIT_CHECKPOINT_SECONDS=0)
alice = login_as(app, "alice")
response = alice.client.post(
    "/chatkit", json=create_request("words=2000 delay=0.02"), buffered=False
)
read_until_delta(response)
print("MID-REPLY", flush=True)
# Falls off the end: a normal exit with the reply still streaming (response kept open).
"""


def test_open_replies_are_saved_at_a_normal_exit_outside_gunicorn(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_MID_REPLY, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MID-REPLY" in done.stdout
    # Cancelled at exit, not streamed to its end (2000 words take 40 s).
    assert elapsed < 20, elapsed

    engine = sa.create_engine(sqlite_url(tmp_path))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT payload FROM chatkit_items")).all()
    finally:
        engine.dispose()
    items = [row[0] if isinstance(row[0], dict) else json.loads(row[0]) for row in rows]
    kinds = [item["type"] for item in items]
    # Checkpoints are off: the partial reply and ChatKit's "stream cancelled" marker
    # are there only because the exit hook cancelled the stream and ChatKit saved it.
    assert kinds == ["user_message", "assistant_message", "sdk_hidden_context"], kinds
    text = items[1]["content"][0]["text"]
    assert text.startswith("w0 ") and "w1999" not in text
    assert "cancelled the stream" in items[2]["content"]
