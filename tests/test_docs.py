"""The documentation site (docs/) says only true things, builds clean and opens clean.

- Every python block of the docs is run or marked as a fragment; the ``run`` blocks are
  executed next to the README's Quickstart ``app.py`` (tests/readme_blocks.py).
- Every ``flask_chatkit.…`` name in the README or the docs resolves to a real object.
- The API reference documents every public name; the configuration page and
  ``ChatKit.init_app``'s docstring list every config key; the HTTP page's error codes are
  the ones the endpoint sends.
- Sphinx builds the site with ``-W -n`` (no warning, no unresolved reference), and every
  page opens in headless Chromium (Debian's, as in tests/test_browser.py) with no console
  error, no page error and no failed request.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flask_chatkit
from flask_chatkit import config, signals, testing
from flask_chatkit.extension import ChatKit

from .readme_blocks import (
    DOCS,
    README,
    UNMARKED_HELP,
    doc_pages,
    python_blocks,
    quickstart_dir_fixture,  # noqa: F401 (the quickstart_dir fixture)
    run_block,
)

ROOT = DOCS.parent
CHROMIUM = "/usr/bin/chromium"
# A dotted name that starts at the package, e.g. flask_chatkit.testing.ChatKitClient.
NAMED = re.compile(r"\bflask_chatkit(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
CONFIG_KEY = re.compile(r"`(CHATKIT_[A-Z0-9_]+)`")
# Keys of the design that are being built on other branches; once in config.DEFAULTS they
# are checked like every other key (and must then be documented already).
DESIGNED_KEYS = {
    "CHATKIT_BODY_TIMEOUT",
    "CHATKIT_MAX_PENDING_ATTACHMENT_BYTES",
    "CHATKIT_MAX_STREAMS_PER_USER",
    "CHATKIT_CHECKPOINT_SECONDS",
}
# Keys the demo app reads, documented on its own page, not flask-chatkit's.
DEMO_KEYS = {"CHATKIT_DOMAIN_KEY"}


def page_rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- code blocks ---------------------------------------------------------------------


def test_every_docs_python_block_is_run_or_marked() -> None:
    unmarked = [
        f"{page_rel(page)} line {block.line}"
        for page in doc_pages()
        for block in python_blocks(page.read_text())
        if block.kind is None
    ]
    assert not unmarked, f"{', '.join(unmarked)}: {UNMARKED_HELP}"


def test_docs_run_blocks_pass(quickstart_dir: Path) -> None:
    ran = []
    for page in doc_pages():
        for block in python_blocks(page.read_text()):
            if block.kind == "run":
                ran += run_block(block, page_rel(page))
    assert len(ran) >= 3, f"expected the testing guide's examples to run, ran {ran}"


def test_a_failing_run_block_fails() -> None:
    text = "<!-- readme-test: run -->\n```python\ndef test_x():\n    assert 1 == 2\n```\n"
    (block,) = python_blocks(text)
    with pytest.raises(AssertionError):
        run_block(block, "example.md")


# -- names ---------------------------------------------------------------------------


def resolve(dotted: str) -> Any:
    """The object a dotted name stands for; raises LookupError when there is none."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists but an import inside it failed
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise LookupError(f"{dotted}: {module_name} has no {'.'.join(parts[split:])}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"{dotted}: no such module")


def named_objects(text: str) -> set[str]:
    return set(NAMED.findall(text))


def test_named_objects_exist() -> None:
    missing = []
    for path in [README, *doc_pages()]:
        for name in sorted(named_objects(path.read_text())):
            try:
                resolve(name)
            except LookupError as exc:
                missing.append(f"{page_rel(path)}: {exc}")
    assert not missing, "the docs name objects that do not exist:\n" + "\n".join(missing)


def test_a_false_name_is_caught() -> None:
    # The README once named this; AttachmentTooLarge lives elsewhere.
    text = "raise `flask_chatkit.attachments.AttachmentTooLarge` past the limit"
    assert named_objects(text) == {"flask_chatkit.attachments.AttachmentTooLarge"}
    with pytest.raises(LookupError):
        resolve("flask_chatkit.attachments.AttachmentTooLarge")
    with pytest.raises(LookupError):
        resolve("flask_chatkit.no_such_module.Thing")
    assert resolve("flask_chatkit.testing.ChatKitClient") is testing.ChatKitClient


# -- the reference pages ---------------------------------------------------------------


def public_names() -> set[str]:
    names = {f"flask_chatkit.{name}" for name in flask_chatkit.__all__}
    names |= {f"flask_chatkit.signals.{name}" for name in signals.__all__}
    names |= {
        f"flask_chatkit.testing.{name}"
        for name, obj in vars(testing).items()
        if name.isidentifier()
        and not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == testing.__name__
    }
    return names


def documented_names(api_md: str) -> set[str]:
    """Targets of the autodoc directives, qualified by the ``.. module::`` in force."""
    names, module = set(), ""
    for line in api_md.splitlines():
        found = re.match(r"\.\. module:: (\S+)", line.strip())
        if found:
            module = found.group(1)
        found = re.match(r"\.\. auto(?:class|function|data|exception):: ([\w.]+)", line.strip())
        if found:
            target = found.group(1)
            names.add(target if target.startswith("flask_chatkit.") else f"{module}.{target}")
    return names


def test_api_reference_documents_every_public_name() -> None:
    documented = documented_names((DOCS / "reference" / "api.md").read_text())
    assert public_names() - documented == set(), "public names missing from reference/api.md"
    assert documented - public_names() == set(), "reference/api.md documents non-public names"


def test_every_config_key_is_documented() -> None:
    keys = set(config.DEFAULTS) | DESIGNED_KEYS
    page = set(CONFIG_KEY.findall((DOCS / "reference" / "config.md").read_text()))
    docstring = set(re.findall(r"``(CHATKIT_[A-Z0-9_]+)``", ChatKit.init_app.__doc__ or ""))
    assert keys - page == set(), "keys missing from docs/reference/config.md"
    assert page - keys - DEMO_KEYS == set(), "docs/reference/config.md lists unknown keys"
    assert keys == docstring, "ChatKit.init_app's docstring must list exactly its keys"


def test_config_defaults_on_the_page_are_the_real_ones() -> None:
    rows = {}
    for line in (DOCS / "reference" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 4 and CONFIG_KEY.fullmatch(cells[0]):
            rows[cells[0].strip("`")] = cells[2]
    for key, value in config.DEFAULTS.items():
        if isinstance(value, bool) or value is None:
            assert rows[key].startswith(f"`{value}`"), (key, rows[key])
        elif isinstance(value, (int, float)):
            shown = re.match(r"`([0-9.]+)`", rows[key])
            assert shown and float(shown.group(1)) == value, (key, rows[key])
        elif isinstance(value, str):
            assert rows[key] == f'`"{value}"`', (key, rows[key])


def test_http_error_codes_are_the_endpoints() -> None:
    from flask_chatkit.errors import STATUS_CODES

    table: dict[int, set[str]] = {}
    for line in (DOCS / "reference" / "http.md").read_text().splitlines():
        found = re.match(r"\| (\d{3}) \| `([a-z_]+)` \|", line)
        if found:
            table.setdefault(int(found.group(1)), set()).add(found.group(2))
    for status, code in STATUS_CODES.items():
        assert code in table.get(status, set()), f"{status} {code} missing from http.md"


# -- the built site in a browser -------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build, the way `make docs` builds: warnings and broken references fail."""
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-n",
            "-E",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.docs
def test_build_has_every_page_and_the_charts(built_site: Path) -> None:
    sources = {p.relative_to(DOCS).with_suffix(".html") for p in doc_pages()}
    built = {p.relative_to(built_site) for p in built_site.rglob("*.html")}
    assert sources <= built
    charts = sorted(p.name for p in (built_site / "_images").glob("bench-*.svg"))
    assert charts == ["bench-ratios.svg", "bench-ttfe.svg"]
    api = (built_site / "reference" / "api.html").read_text()
    assert 'id="flask_chatkit.ChatKit.init_app"' in api
    assert "CHATKIT_MAX_PENDING_ATTACHMENT_BYTES" in api  # from init_app's docstring


@pytest.fixture(scope="module")
def site_url(built_site: Path) -> Iterator[str]:
    """The built HTML over HTTP on a loopback port (search needs more than file://)."""
    handler = functools.partial(QuietHandler, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.browser
def test_every_page_opens_without_console_errors(
    built_site: Path, site_url: str, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"BROWSER TEST SKIPPED: {CHROMIUM} is missing (`make system-deps`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    pages = sorted(
        str(p.relative_to(built_site))
        for p in built_site.rglob("*.html")
        if "_sources" not in p.parts
    )
    problems: list[str] = []
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            current = [""]
            page.on(
                "console",
                lambda m: (
                    m.type == "error"
                    and problems.append(
                        f"{current[0]}: console {m.text} at {m.location.get('url')}"
                    )
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"{current[0]}: page error {e}"))
            page.on(
                "requestfailed", lambda r: problems.append(f"{current[0]}: request failed {r.url}")
            )
            page.on(
                "response",
                lambda r: r.status >= 400 and problems.append(f"{current[0]}: {r.status} {r.url}"),
            )
            for name in pages:
                current[0] = name
                # networkidle: late requests (the favicon) finish before the next page,
                # so one aborted by leaving the page never reads as a failure.
                page.goto(f"{site_url}/{name}", wait_until="networkidle")
                assert page.title(), name
            # The search runs JavaScript over the index and fetches each hit's page.
            current[0] = "search.html"
            page.goto(f"{site_url}/search.html?q=gunicorn", wait_until="load")
            summary = page.locator("#search-results .search-summary")
            sync_api.expect(summary).to_contain_text("found", timeout=15_000)
            assert page.locator("#search-results li").count() >= 3
            page.wait_for_load_state("networkidle")
            current[0] = "benchmarks.html"
            page.goto(f"{site_url}/benchmarks.html", wait_until="networkidle")
            widths = page.eval_on_selector_all(
                "img[src*='bench-']", "imgs => imgs.map(i => i.naturalWidth)"
            )
            assert len(widths) == 2 and all(w > 0 for w in widths), widths
            page.screenshot(path=str(tmp_path / "benchmarks.png"), full_page=False)
        finally:
            browser.close()
    assert len(pages) >= 20
    assert not problems, "\n".join(problems)
