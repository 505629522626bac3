from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app
from .components import SKIP_TAG, under_ci
from .memory_store import MemoryStore

pytest_plugins = ["tests.pg", "tests.s3"]

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
def alice(client: FlaskClient) -> Iterator[ChatKitClient]:
    assert client.post("/login/alice").status_code == 200
    yield ChatKitClient(client)


@pytest.fixture
def bob(app: Flask) -> ChatKitClient:
    other = app.test_client()
    assert other.post("/login/bob").status_code == 200
    return ChatKitClient(other)
