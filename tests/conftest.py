from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app
from .memory_store import MemoryStore

pytest_plugins = ["tests.pg", "tests.s3"]


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
