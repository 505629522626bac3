"""The README's code runs as pasted: the Quickstart as ``app.py``, and every other block.

The Quickstart is imported with the Flask test client, then served by a real
``gunicorn -k gevent app:app`` and by ``flask --app app run`` from a temp dir, and
chats: sign in, stream a reply, check its text. Blocks marked
``<!-- readme-test: run -->`` are executed next to that ``app.py``; every other python
block must be marked ``<!-- fragment -->`` (see tests/readme_blocks.py). The docs'
blocks are run the same way by tests/test_docs.py.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .gunicorn import free_port, start_gunicorn, stop_process, wait_for_port
from .readme_blocks import (
    UNMARKED_HELP,
    chat_over_http,
    create_thread_body,
    python_blocks,
    quickstart_dir_fixture,  # noqa: F401 (the quickstart_dir fixture)
    run_block,
)

FLASK = str(Path(sys.executable).with_name("flask"))
REPLY = "Hello alice, you said: hi there"


def test_every_python_block_is_run_or_marked() -> None:
    blocks = python_blocks()
    unmarked = [f"README.md line {b.line}" for b in blocks if b.kind is None]
    assert not unmarked, f"{', '.join(unmarked)}: {UNMARKED_HELP}"
    assert [b.kind for b in blocks].count("quickstart") == 1


def test_unmarked_block_is_caught() -> None:
    text = "intro\n\n```python\nprint('hi')\n```\n<!-- fragment -->\n```python\nx\n```\n"
    assert [(b.line, b.kind) for b in python_blocks(text)] == [(3, None), (7, "fragment")]


def test_quickstart_with_the_test_client(quickstart_dir: Path) -> None:
    app = importlib.import_module("app").app
    assert Path(app.root_path) == quickstart_dir
    client = app.test_client()
    assert client.post("/chatkit", json=create_thread_body("hi")).status_code == 401
    assert client.get("/demo-login/alice").status_code == 302
    assert client.get("/chatkit/console").status_code == 200
    response = client.post("/chatkit", json=create_thread_body("hi there"))
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = [
        json.loads(line[6:])
        for line in response.get_data(as_text=True).splitlines()
        if line.startswith("data: ")
    ]
    deltas = "".join(e["update"]["delta"] for e in events if e["type"] == "thread.item.updated")
    assert deltas.strip() == REPLY
    done = [e["item"] for e in events if e["type"] == "thread.item.done"]
    assert done[-1]["content"][0]["text"] == REPLY
    assert (quickstart_dir / "instance" / "chatkit.sqlite3").exists()


def test_run_blocks_pass(quickstart_dir: Path) -> None:
    # The README keeps only the Quickstart; its tested examples live in docs/ now.
    for block in python_blocks():
        if block.kind == "run":
            run_block(block, "README.md")


def assert_chats(base_url: str) -> None:
    text, arrivals = chat_over_http(base_url, "alice", "hi there")
    assert text == REPLY
    # Streamed, not buffered: the server sleeps 50 ms between its six words.
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 0.2


@pytest.mark.integration
def test_quickstart_under_gunicorn_gevent(quickstart_dir: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(quickstart_dir)}  # app.py only, as a user would have it
    with start_gunicorn(tmp_path, "app:app", env=env, cwd=quickstart_dir) as server:
        assert_chats(server.url)
        assert "Traceback" not in server.log()


@pytest.mark.integration
def test_quickstart_under_flask_run(quickstart_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "flask-run.log"
    args = [FLASK, "--app", "app", "run", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, cwd=quickstart_dir, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        assert_chats(f"http://127.0.0.1:{port}")
    finally:
        stop_process(proc)
    assert "Traceback" not in log_path.read_text()
