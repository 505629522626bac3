"""``GET <prefix>/health``: checks, failures named, off switch, PostgreSQL stopped and back."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, inspect

from flask_chatkit.attachments import FileAttachmentStore
from flask_chatkit.extension import ChatKit
from flask_chatkit.web.health import CHECK_TIMEOUT, LOOP_TIMEOUT, SENTINEL_ID

from .apps import ScriptedServer, create_test_app


def sql_app(tmp_path: Path, **config: Any) -> Flask:
    config.setdefault("CHATKIT_DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite3'}")
    return create_test_app(store=None, instance_path=str(tmp_path / "instance"), **config)


def assert_unavailable(response: Any, failing: str) -> dict[str, Any]:
    assert response.status_code == 503, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["error"]["code"] == "service_unavailable"
    assert failing in body["error"]["message"]
    return dict(body["checks"])


def test_healthy_without_login_and_without_user_data(tmp_path: Path) -> None:
    client = sql_app(tmp_path).test_client()  # nobody logged in
    response = client.get("/chatkit/health")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "checks": {"event_loop": "ok", "database": "ok", "attachments": "ok"},
    }
    assert response.headers["Cache-Control"] == "no-store"
    # Nothing created or scanned: the schema is left to the first ChatKit request.
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert inspect(engine).get_table_names() == []
    engine.dispose()
    assert client.head("/chatkit/health").status_code == 200
    assert client.post("/chatkit/health").status_code == 405


def test_polling_is_fast(tmp_path: Path) -> None:
    client = sql_app(tmp_path).test_client()
    started = time.monotonic()
    for _ in range(20):
        assert client.get("/chatkit/health").status_code == 200
    assert time.monotonic() - started < 5.0  # ~1 ms each unloaded; generous for a busy CI


def test_off_with_chatkit_health_false(tmp_path: Path) -> None:
    response = sql_app(tmp_path, CHATKIT_HEALTH=False).test_client().get("/chatkit/health")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_unwritable_attachment_storage_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    client = sql_app(tmp_path, CHATKIT_ATTACHMENTS_DIR=str(blocker / "files")).test_client()
    checks = assert_unavailable(client.get("/chatkit/health"), "attachments")
    assert checks == {"event_loop": "ok", "database": "ok", "attachments": "unavailable"}


class ProbedStorage:
    """A blob storage without ``check()``: health falls back to ``exists()``."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.asked: list[str] = []

    def exists(self, attachment_id: str) -> bool:
        self.asked.append(attachment_id)
        if self.fail:
            raise ConnectionError("bucket unreachable")
        return False


@pytest.mark.parametrize("fail", [False, True])
def test_storage_without_check_is_probed_with_exists(tmp_path: Path, fail: bool) -> None:
    from .memory_store import MemoryStore

    storage = ProbedStorage(fail)
    app = Flask("health_custom_storage", instance_path=str(tmp_path))
    ChatKit(app, ScriptedServer, store=MemoryStore(),
            attachment_store=FileAttachmentStore(storage))  # type: ignore[arg-type]
    response = app.test_client().get("/chatkit/health")
    assert storage.asked == [SENTINEL_ID]
    if fail:
        # MemoryStore has no ping(): no database check to report.
        assert assert_unavailable(response, "attachments") == {
            "event_loop": "ok", "attachments": "unavailable"}
    else:
        assert response.status_code == 200


def test_a_stalled_event_loop_is_named(tmp_path: Path) -> None:
    app = sql_app(tmp_path)
    loop_thread = app.extensions["chatkit"].loop_thread
    client = app.test_client()
    assert client.get("/chatkit/health").status_code == 200
    stall = LOOP_TIMEOUT + 0.5
    loop_thread.loop.call_soon_threadsafe(time.sleep, stall)  # what a sync call in respond does
    started = time.monotonic()
    try:
        checks = assert_unavailable(client.get("/chatkit/health"), "event_loop")
        assert time.monotonic() - started < stall + 1  # bounded: answers, does not hang
        assert checks == {"event_loop": "timeout", "database": "skipped",
                          "attachments": "skipped"}
    finally:
        time.sleep(max(0.0, started + stall - time.monotonic()) + 0.1)
    assert client.get("/chatkit/health").status_code == 200


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_postgres_stopped_then_restarted(tmp_path: Path, private_pg_cluster: Any) -> None:
    client = sql_app(tmp_path, CHATKIT_DATABASE_URL=private_pg_cluster.url).test_client()
    assert client.get("/chatkit/health").status_code == 200
    private_pg_cluster.stop()
    started = time.monotonic()
    checks = assert_unavailable(client.get("/chatkit/health"), "database")
    assert time.monotonic() - started < 5  # refused at once; never beyond the check's timeout
    assert checks == {"event_loop": "ok", "database": "unavailable", "attachments": "ok"}
    private_pg_cluster.start()
    # The pool's dead connections are replaced (pre-ping): healthy on the next poll.
    deadline = time.monotonic() + 10
    while (status := client.get("/chatkit/health").status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


class UnbuildableStorage(FileAttachmentStore):
    @property
    def storage(self) -> Any:
        raise RuntimeError("no credentials for the bucket")


def test_a_storage_that_cannot_be_built_is_named(tmp_path: Path) -> None:
    from .memory_store import MemoryStore

    app = Flask("health_unbuildable", instance_path=str(tmp_path))
    ChatKit(app, ScriptedServer, store=MemoryStore(), attachment_store=UnbuildableStorage())
    checks = assert_unavailable(app.test_client().get("/chatkit/health"), "attachments")
    assert checks == {"event_loop": "ok", "attachments": "unavailable"}


def _cluster_pids(cluster: Any) -> list[int]:
    """The postmaster (first line of postmaster.pid) and every backend it forked."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_database_that_does_not_answer_is_a_timeout(
    tmp_path: Path, private_pg_cluster: Any
) -> None:
    # The server is up but frozen (SIGSTOP of the whole cluster: the connection is
    # open, the SELECT 1 is never answered), the state a load balancer must see as
    # "timeout" within the check's bound, with the other checks still answered.
    client = sql_app(tmp_path, CHATKIT_DATABASE_URL=private_pg_cluster.url).test_client()
    assert client.get("/chatkit/health").status_code == 200
    pids = _cluster_pids(private_pg_cluster)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        checks = assert_unavailable(client.get("/chatkit/health"), "database")
        elapsed = time.monotonic() - started
        assert checks == {"event_loop": "ok", "database": "timeout", "attachments": "ok"}
        # It waited for the database's own bound, and no longer: a hung probe never
        # holds the route (nor the loop) beyond it.
        assert CHECK_TIMEOUT - 0.1 <= elapsed < CHECK_TIMEOUT + LOOP_TIMEOUT + 3
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # Thawed: the hung SELECT 1 completes and the next poll is healthy.
    deadline = time.monotonic() + 10
    while (status := client.get("/chatkit/health").status_code) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
