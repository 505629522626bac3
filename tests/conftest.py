from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.bridge.loop import LoopThread
from flask_chatkit.testing import ChatKitClient

from . import gunicorn as gunicorn_helpers
from . import helpers
from .apps import create_test_app
from .components import SKIP_TAG, under_ci
from .memory_store import MemoryStore

pytest_plugins = ["tests.pg", "tests.s3"]

def pytest_runtest_setup(item: pytest.Item) -> None:
    # start_gunicorn / start_flask_run refuse to run in a test without `integration`.
    gunicorn_helpers.current_test_markers = {mark.name for mark in item.iter_markers()}


def pytest_runtest_teardown(item: pytest.Item) -> None:
    gunicorn_helpers.current_test_markers = None


# -- CI: a component that could not start fails the run (tests/components.py) ----------

_component_skips: list[str] = []


def _note_component_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and SKIP_TAG in str(report.longrepr):
        _component_skips.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_component_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_component_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Belt and braces for :func:`tests.components.unavailable`: under CI, any skip
    of a real component that still got through turns a green exit status red."""
    if under_ci() and _component_skips and exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _component_skips:
        terminalreporter.section("real components that could not start", sep="!")
        for nodeid in _component_skips[:20]:
            terminalreporter.line(f"SKIPPED (component unavailable): {nodeid}")
        if under_ci():
            terminalreporter.line("CI is set: these fail the run.")


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def app(store: MemoryStore, tmp_path: Any) -> Flask:
    return create_test_app(store=store, instance_path=str(tmp_path / "instance"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def login_as(app: Flask) -> Callable[[str], ChatKitClient]:
    """``login_as("ada")``: a new test client of ``app``, logged in, as a ChatKitClient."""
    return lambda user: helpers.login_as(app, user)


@pytest.fixture
def alice(client: FlaskClient) -> ChatKitClient:
    return helpers.login_as(client, "alice")


@pytest.fixture
def bob(login_as: Callable[[str], ChatKitClient]) -> ChatKitClient:
    return login_as("bob")


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Callable[..., Flask]:
    """``sqlite_app(**config)``: the test app on a SQLite file in ``tmp_path``."""
    return lambda **config: helpers.sqlite_app(tmp_path, **config)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """The extension's event-loop thread, for unit tests of the bridge; shut down after."""
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.shutdown()
