"""End to end in a real browser: gunicorn -k gevent + the demo app + headless Chromium.

The server is the repo's own ``gunicorn.conf.py`` + ``wsgi:app``, pointed by environment
variables at a temporary instance folder and SQLite database. Chromium is Debian's
``/usr/bin/chromium`` (``make system-deps``), driven by Playwright's Python package;
Playwright's own browser download is never used. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .components import unavailable
from .gunicorn import free_port, stop_process

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PENDING = re.compile(r"\bpending\b")
WAIT_MS = 15_000  # default bound for every Playwright wait
WORD_DELAY = "0.05"  # seconds between streamed words: the long answer takes ~12 s

if not Path(CHROMIUM).exists():
    unavailable(
        "Chromium",
        f"{CHROMIUM} is missing. Install Debian's chromium "
        "(`make system-deps`, or `apt-get install chromium`) to run the browser tests.",
        allow_module_level=True,
    )
try:
    import playwright.sync_api as sync_api
except ImportError:
    unavailable("Playwright", "the playwright package is missing", allow_module_level=True)
expect = sync_api.expect


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"gunicorn not healthy within {timeout}s:\n{log.read_text()}")


@contextmanager
def serve_demo(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on a free port, with a throwaway instance."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY="1",
        FLASK_INSTANCE_PATH=str(tmp / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp / 'chatkit.sqlite3'}",
        SECRET_KEY="browser-test-secret",
        DEMO_WORD_DELAY=WORD_DELAY,
        DEMO_OFFLINE="1",
        **(extra_env or {}),
    )
    log = tmp / "gunicorn.log"
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [gunicorn, "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, timeout=30)
        yield url
    finally:
        stop_process(proc, timeout=20)
        print(f"--- gunicorn log ({log}) ---\n{log.read_text(errors='replace')[-5000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_demo(tmp_path_factory.mktemp("browser-server")) as url:
        yield url


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """One Playwright driver for the module (it allows only one at a time)."""
    with sync_api.sync_playwright() as driver:
        yield driver


@contextmanager
def chromium(playwright: Any, profile: Path) -> Iterator[Any]:
    """A headless Chromium context of its own (own profile, so own cookies)."""
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 800},
    )
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    # Offline by design: OpenAI's CDN is refused, so the demo page must fall back.
    context.route("https://cdn.platform.openai.com/**", lambda route: route.abort())
    try:
        yield context
    finally:
        context.close()


@pytest.fixture(scope="module")
def browser_context(playwright: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(playwright, tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


def sign_in(page: Any, server: str, user: str = "alice") -> None:
    page.goto(server + "/")
    expect(page).to_have_url(server + "/login?next=%2F")
    page.fill("#username", user)
    page.click("#login-submit")
    expect(page.get_by_test_id("signed-in-as")).to_contain_text(user)


@pytest.fixture(scope="module")
def page(browser_context: Any, server: str) -> Iterator[Any]:
    """A page signed in as ``alice`` through the demo's login form."""
    page = browser_context.new_page()
    sign_in(page, server)
    yield page
    page.close()


def assistant_texts(page: Any) -> list[str]:
    texts: list[str] = page.locator("#messages .message.assistant .text").all_inner_texts()
    return texts


def test_index_falls_back_to_console_without_cdn(page: Any, server: str, tmp_path: Path) -> None:
    page.goto(server + "/")
    expect(page.locator("body")).to_have_attribute("data-chatkit", "fallback")
    frame = page.locator("#console-frame")
    expect(frame).to_have_attribute("src", "/chatkit/console")
    console = page.frame_locator("#console-frame")
    expect(console.locator("#composer-input")).to_be_visible()
    expect(console.locator("#api-url")).to_have_text("/chatkit")
    page.screenshot(path=str(tmp_path / "fallback.png"))


def test_stream_stop_and_reload_keeps_partial(page: Any, server: str, tmp_path: Path) -> None:
    p = page
    p.goto(server + "/chatkit/console")
    expect(p.locator("body")).to_have_attribute("data-ready", "true")

    # 1. A first message: the reply streams in, word by word, then completes.
    p.fill("#composer-input", "Hello from the browser")
    p.click("#send")
    assistant = p.locator("#messages .message.assistant")
    expect(assistant.first).to_have_class(PENDING)
    expect(assistant.first).to_contain_text("You said 1 message so far", timeout=20_000)
    expect(assistant.first).not_to_have_class(PENDING)
    expect(p.locator("#messages .message.user .text")).to_have_text(["Hello from the browser"])
    deltas = p.locator('#event-log li[data-type="thread.item.updated"]').count()
    assert deltas > 10, f"expected many streamed deltas, saw {deltas}"
    expect(p.locator("#thread-title")).to_have_text("Hello from the browser")
    expect(p.locator("#thread-list li")).to_have_count(1)

    # 2. A long answer, stopped mid-way.
    p.fill("#composer-input", "Now tell me something long please")
    p.click("#send")
    p.wait_for_function(
        """() => {
            const el = document.querySelector('#messages .message.assistant.pending .text');
            return el && el.textContent.split(/\\s+/).length > 25;
        }""",
        timeout=20_000,
    )
    expect(p.locator("#stop")).to_be_enabled()
    p.click("#stop")
    stopped = p.locator("#messages .message.assistant.stopped")
    expect(stopped).to_have_count(1)
    expect(p.locator("#status")).to_contain_text("Stopped")
    seen = stopped.locator(".text").inner_text()
    assert "end of the long answer" not in seen
    p.screenshot(path=str(tmp_path / "console-stopped.png"))

    # 3. Reload: the thread reopens from the URL and the partial reply was kept.
    deadline = time.monotonic() + 15
    while True:
        p.reload()
        expect(p.locator("body")).to_have_attribute("data-ready", "true")
        if len(assistant_texts(p)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    texts = assistant_texts(p)
    assert len(texts) == 2, f"after reload: {texts!r}"
    kept = texts[1]
    assert kept.startswith(seen.strip()[:60]), (seen, kept)
    assert len(kept) >= len(seen.strip())
    assert "end of the long answer" not in kept
    expect(p.locator("#thread-title")).to_have_text("Hello from the browser")
    p.screenshot(path=str(tmp_path / "console-after-reload.png"))
    print(f"screenshots in {tmp_path}")


def test_widget_button_runs_action(page: Any, server: str, tmp_path: Path) -> None:
    p = page
    p.goto(server + "/chatkit/console")
    expect(p.locator("body")).to_have_attribute("data-ready", "true")
    p.click("#new-thread")
    p.fill("#composer-input", "Show me a widget")
    p.click("#send")
    button = p.locator("#messages .widget button.widget-button")
    expect(button).to_have_text("Tell me more", timeout=20_000)
    expect(p.locator("#send")).to_be_enabled(timeout=20_000)
    button.click()
    expect(p.locator("#messages .message.assistant").last).to_contain_text(
        "You pressed the widget's button", timeout=20_000
    )
    expect(button).to_have_text("Thanks!")
    expect(button).to_be_disabled()
    p.screenshot(path=str(tmp_path / "console-widget.png"))


def test_attachment_upload_is_seen_by_the_server(page: Any, server: str, tmp_path: Path) -> None:
    p = page
    p.goto(server + "/chatkit/console")
    expect(p.locator("body")).to_have_attribute("data-ready", "true")
    p.click("#new-thread")
    p.set_input_files(
        "#attach", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello\n"}]
    )
    p.fill("#composer-input", "Here is a file")
    p.click("#send")
    reply = p.locator("#messages .message.assistant").last
    expect(reply).to_contain_text("You attached 1 file(s)", timeout=20_000)
    expect(reply).to_contain_text("notes.txt (text/plain)")
    chips = p.locator("#messages .message.user .attachment")
    expect(chips).to_have_text(["notes.txt (text/plain)"])
    p.screenshot(path=str(tmp_path / "console-attachment.png"))


# -- ChatKit.js that hangs or fails: a visible loading state, then the console ----------
SLOW_TIMEOUT_MS = 4000  # the demo's DEMO_CHATKIT_JS_TIMEOUT_MS for these tests


class HangingScriptServer:
    """A loopback HTTP server that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/chatkit.js"
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture(scope="module")
def hanging_script() -> Iterator[HangingScriptServer]:
    server = HangingScriptServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def slow_server(
    tmp_path_factory: pytest.TempPathFactory, hanging_script: HangingScriptServer
) -> Iterator[str]:
    """The demo with DEMO_CHATKIT_JS_URL pointing at the hanging loopback script."""
    extra = {
        "FLASK_DEMO_CHATKIT_JS_URL": hanging_script.url,
        "FLASK_DEMO_CHATKIT_JS_TIMEOUT_MS": str(SLOW_TIMEOUT_MS),
    }
    with serve_demo(tmp_path_factory.mktemp("browser-slow-server"), extra) as url:
        yield url


@pytest.fixture(scope="module")
def slow_context(
    playwright: Any, tmp_path_factory: pytest.TempPathFactory, slow_server: str
) -> Iterator[Any]:
    """A browser of its own, signed in as ``bob`` on the slow server."""
    with chromium(playwright, tmp_path_factory.mktemp("chromium-slow-profile")) as context:
        page = context.new_page()
        sign_in(page, slow_server, "bob")
        page.close()
        yield context


def fake_chatkit(error_message: str) -> str:
    """A stand-in for ChatKit.js: defines <openai-chatkit>, gets ready, then reports an error."""
    return """
    customElements.define("openai-chatkit", class extends HTMLElement {
      setOptions(options) {
        window.chatkitOptions = options;
        const el = this;
        setTimeout(() => {
          el.dispatchEvent(new CustomEvent("chatkit.ready"));
        }, 50);
        window.sendChatkitError = () => el.dispatchEvent(new CustomEvent("chatkit.error",
          {detail: {error: new Error(MESSAGE)}}));
      }
    });
    """.replace("MESSAGE", json.dumps(error_message))


def test_loading_state_is_visible_while_chatkit_js_hangs(
    slow_context: Any, slow_server: str, hanging_script: HangingScriptServer, tmp_path: Path
) -> None:
    page = slow_context.new_page()
    try:
        started = time.monotonic()
        page.goto(slow_server + "/", wait_until="domcontentloaded")
        loading = page.get_by_test_id("chatkit-loading")
        expect(loading).to_be_visible()
        expect(loading).to_contain_text("Loading ChatKit")
        expect(page.locator("body")).to_have_attribute("data-chatkit", "loading")
        # The script request really is hanging on the loopback server, not failed.
        deadline = time.monotonic() + 5
        while not hanging_script.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hanging_script.accepted, "the page never requested ChatKit.js"
        page.wait_for_timeout(1000)
        expect(loading).to_be_visible()  # still loading, not a blank page
        page.screenshot(path=str(tmp_path / "loading.png"))

        expect(page.locator("body")).to_have_attribute("data-chatkit", "fallback")
        elapsed = time.monotonic() - started
        assert elapsed >= SLOW_TIMEOUT_MS / 1000 - 0.5, elapsed
        expect(page.locator("#fallback")).to_have_attribute("data-reason", "timeout")
        expect(loading).to_be_hidden()
        console = page.frame_locator("#console-frame")
        expect(console.locator("#composer-input")).to_be_visible()
    finally:
        page.close()


@pytest.mark.parametrize(
    ("message", "falls_back"),
    [
        ("Domain key refused: this domain is not allowed for the domain key", True),
        ("Stream interrupted: network error", False),
    ],
)
def test_chatkit_error_that_breaks_the_ui_falls_back_to_the_console(
    slow_context: Any,
    slow_server: str,
    hanging_script: HangingScriptServer,
    message: str,
    falls_back: bool,
) -> None:
    page = slow_context.new_page()
    try:
        script = fake_chatkit(message)
        page.route(
            hanging_script.url,
            lambda route: route.fulfill(body=script, content_type="text/javascript"),
        )
        page.goto(slow_server + "/")
        body = page.locator("body")
        expect(body).to_have_attribute("data-chatkit", "ready")
        expect(page.get_by_test_id("chatkit-loading")).to_be_hidden()
        assert page.evaluate("window.chatkitOptions.api.url") == "/chatkit"
        page.evaluate("window.sendChatkitError()")
        if falls_back:
            expect(body).to_have_attribute("data-chatkit", "fallback")
            expect(page.locator("#fallback")).to_have_attribute("data-reason", "chatkit-error")
            expect(page.get_by_test_id("chatkit")).to_have_count(0)
            console = page.frame_locator("#console-frame")
            expect(console.locator("#composer-input")).to_be_visible()
        else:
            expect(page.locator("#chatkit-trouble")).to_be_visible()
            expect(body).to_have_attribute("data-chatkit", "ready")
            expect(page.get_by_test_id("chatkit")).to_have_count(1)
    finally:
        page.close()


def test_an_error_before_ready_falls_back(
    slow_context: Any, slow_server: str, hanging_script: HangingScriptServer
) -> None:
    script = """
    customElements.define("openai-chatkit", class extends HTMLElement {
      setOptions(options) {
        setTimeout(() => this.dispatchEvent(new CustomEvent("chatkit.error",
          {detail: {error: new Error("Failed to initialise")}})), 50);
      }
    });
    """
    page = slow_context.new_page()
    try:
        page.route(
            hanging_script.url,
            lambda route: route.fulfill(body=script, content_type="text/javascript"),
        )
        page.goto(slow_server + "/")
        expect(page.locator("body")).to_have_attribute("data-chatkit", "fallback")
        expect(page.locator("#fallback")).to_have_attribute("data-reason", "chatkit-error")
    finally:
        page.close()


def test_sign_out_is_a_post_with_the_token(page: Any, server: str) -> None:
    """Signs the shared ``page`` out: keep it after every other test that uses ``page``."""
    p = page
    # What a cross-site link or <img src> would do: no sign-out.
    response = p.goto(server + "/logout")
    assert response is not None and response.status == 405
    p.goto(server + "/")
    expect(p.get_by_test_id("signed-in-as")).to_contain_text("alice")
    # The page's own Sign out button posts the form with its CSRF token.
    p.click("#logout")
    expect(p).to_have_url(server + "/login")
    p.goto(server + "/")
    expect(p).to_have_url(server + "/login?next=%2F")
