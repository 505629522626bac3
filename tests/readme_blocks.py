"""The python code blocks of the README and the docs, and the markers that say what the
tests do with them (tests/test_readme.py, tests/test_docs.py).

A marker is an HTML comment on the line before the opening fence:
``<!-- readme-test: quickstart -->`` (the one complete app, run as ``app.py``),
``<!-- readme-test: run -->`` (executed next to that ``app.py``), or
``<!-- fragment -->`` (an excerpt, not meant to run on its own).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

MARKERS = {
    "<!-- readme-test: quickstart -->": "quickstart",
    "<!-- readme-test: run -->": "run",
    "<!-- fragment -->": "fragment",
}
FENCE = re.compile(r"^```python\s*$")
UNMARKED_HELP = (
    "every ```python block in README.md and docs/ must be run by the tests or marked as a "
    "fragment. Put one of these on the line right before the opening fence: "
    "'<!-- fragment -->' (an excerpt that needs code around it), "
    "'<!-- readme-test: run -->' (a self-contained block: the test executes it next to the "
    "Quickstart's app.py and calls every test_* function it defines)."
)


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    kind: str | None  # "quickstart", "run", "fragment" or None (unmarked)
    code: str


def python_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if FENCE.match(lines[index]):
            previous = lines[index - 1].strip() if index else ""
            end = next(
                (j for j in range(index + 1, len(lines)) if lines[j].startswith("```")),
                len(lines),
            )
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(index + 1, MARKERS.get(previous), code))
            index = end
        index += 1
    return blocks


def doc_pages() -> list[Path]:
    """Every Markdown page of the docs site."""
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def run_block(block: Block, origin: str) -> list[str]:
    """Execute a ``run`` block and call every ``test_*`` function it defines.

    Runs in the current directory and ``sys.path``, so a test that prepared the
    Quickstart's ``app.py`` there lets the block ``from app import app``. Returns the
    names of the functions called.
    """
    namespace: dict[str, Any] = {"__name__": f"block_{block.line}"}
    exec(compile(block.code, f"{origin}:{block.line}", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    for test in tests:
        test()
    return [f"{origin}:{block.line}:{test.__name__}" for test in tests]


def quickstart_code() -> str:
    found = [b for b in python_blocks() if b.kind == "quickstart"]
    assert len(found) == 1, f"README.md needs exactly one quickstart block, found {len(found)}"
    return found[0].code


def create_thread_body(text: str) -> dict[str, Any]:
    return {
        "type": "threads.create",
        "params": {
            "input": {
                "content": [{"type": "input_text", "text": text}],
                "attachments": [],
                "inference_options": {},
            }
        },
    }


def chat_over_http(base_url: str, user: str, text: str) -> tuple[str, list[float]]:
    """Sign in through the Quickstart's demo route, stream one reply over real HTTP.

    Returns the reply text and the arrival times of its deltas.
    """
    with requests.Session() as session:
        return _chat(session, base_url, user, text)


def _chat(
    session: requests.Session, base_url: str, user: str, text: str
) -> tuple[str, list[float]]:
    # Generous: the first request waits for the worker to boot (imports, under load).
    login = session.get(f"{base_url}/demo-login/{user}", allow_redirects=False, timeout=60)
    assert login.status_code == 302, login.text
    with session.post(
        f"{base_url}/chatkit", json=create_thread_body(text), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        arrivals, done = [], ""
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "thread.item.updated":
                arrivals.append(time.monotonic())
            if event["type"] == "thread.item.done" and event["item"]["type"] == "assistant_message":
                done = event["item"]["content"][0]["text"]
    return done, arrivals


@pytest.fixture(name="quickstart_dir")
def quickstart_dir_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp dir holding the Quickstart as ``app.py``, importable as ``app``."""
    folder = tmp_path / "quickstart"
    folder.mkdir()
    (folder / "app.py").write_text(quickstart_code())
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    for name in ("app", "test_app"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield folder
    sys.modules.pop("app", None)
