"""PostgreSQL fixtures (a pytest plugin: ``pytest_plugins = ["tests.pg"]``).

``pg_cluster`` / ``postgres_url``: one throwaway cluster per test session.
``private_pg_cluster``: a cluster of the test's own, free to ``stop()``/``start()``.
``store_url``: a fresh database per test, on SQLite and on PostgreSQL.
``sql_store``: a ``SQLAlchemyStore`` with its tables on ``store_url``.
``fresh_database(cluster)``: an empty database of its own, dropped afterwards.
When PostgreSQL cannot be started the PostgreSQL tests are skipped LOUDLY (under
``CI=true`` they fail: tests/components.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.pgcluster import ClusterUnavailable, PostgresCluster
from flask_chatkit.storage.sql import SQLAlchemyStore

from .components import unavailable

__all__ = ["PostgresCluster", "fresh_database"]


def _create_cluster() -> PostgresCluster:
    try:
        return PostgresCluster.create()
    except ClusterUnavailable as exc:
        unavailable("PostgreSQL", str(exc))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = _create_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def postgres_url(pg_cluster: PostgresCluster) -> str:
    """``postgresql+psycopg://chatkit@127.0.0.1:PORT/chatkit`` (trust auth)."""
    return pg_cluster.url


@pytest.fixture
def private_pg_cluster() -> Iterator[PostgresCluster]:
    """A cluster only this test uses: stop and restart it at will."""
    cluster = _create_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for each test: a SQLite file, or a new PG database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chatkit.sqlite3'}"
        return
    with fresh_database(request.getfixturevalue("pg_cluster")) as url:
        yield url


@pytest.fixture
def sql_store(store_url: str) -> Iterator[SQLAlchemyStore]:
    """A ``SQLAlchemyStore`` with its tables on ``store_url``; closed afterwards."""
    s = SQLAlchemyStore(store_url)
    s.create_all()
    yield s
    s.close()
    s.engine.dispose()


@contextmanager
def fresh_database(cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database on ``cluster``, dropped on exit."""
    url = cluster.create_database()
    try:
        yield url
    finally:
        cluster.drop_database(url.rsplit("/", 1)[1])
