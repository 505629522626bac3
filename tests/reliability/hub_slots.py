"""Run by ``test_postgres_waits``: more PostgreSQL store calls at once than the engine
has connections, made from the loop on the gevent hub, while a lock holds them all for
longer than the pool's timeout. Prints what happened as one line of JSON.

    python -m tests.reliability.hub_slots SQLALCHEMY_URL

A subprocess because gevent must patch the process before anything else is imported.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402
from chatkit.types import ThreadMetadata  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402

from flask_chatkit.bridge.hub_loop import HubLoop  # noqa: E402
from flask_chatkit.storage.sql import SQLAlchemyStore  # noqa: E402

CONNECTIONS = 2
CALLS = 8
POOL_TIMEOUT = 1.0  # a call left waiting in SQLAlchemy's pool fails after this
HELD = 2.5  # how long the lock holds every write: longer than POOL_TIMEOUT


def main(url: str) -> dict[str, object]:
    engine = create_engine(
        url, pool_size=CONNECTIONS, max_overflow=0, pool_timeout=POOL_TIMEOUT
    )
    store = SQLAlchemyStore(engine)
    store.create_all()
    hub_loop = HubLoop(executor_workers=1)
    owner = SimpleNamespace(user_id="ann")

    async def saves() -> list[str | None]:
        results = await asyncio.gather(
            *(store.save_thread(ThreadMetadata(id=f"thr_{n}", created_at=datetime.now()), owner)
              for n in range(CALLS)),
            return_exceptions=True,
        )  # fmt: skip
        return [type(r).__name__ if isinstance(r, BaseException) else None for r in results]

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    started = time.monotonic()
    with psycopg.connect(dsn) as lock:
        lock.execute("LOCK TABLE chatkit_threads IN ACCESS EXCLUSIVE MODE")
        future = asyncio.run_coroutine_threadsafe(saves(), hub_loop.loop)
        gevent.sleep(HELD)
        in_use = engine.pool.checkedout()  # type: ignore[attr-defined]
        lock.rollback()  # releases the lock
    errors = future.result(timeout=30)
    with psycopg.connect(dsn) as check:
        stored = check.execute("SELECT count(*) FROM chatkit_threads").fetchone()
    return {
        "errors": errors,
        "stored": stored[0] if stored else None,
        "connections_in_use_while_held": in_use,
        "store_threads": store._pool._started,
        "seconds": round(time.monotonic() - started, 2),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
