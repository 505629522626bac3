"""Behind a real proxy: Debian's nginx, configured as ``docs/nginx.conf.example``, in
front of ``gunicorn -k gevent`` (issue 17).

nginx runs as this test's own process (``daemon off``, its pid file, logs and temp
files in the test's tmp dir, on a free 127.0.0.1 port) and is stopped on every
path, with a SIGKILL fallback. Without nginx the test skips, except with
``CI=true`` where it fails (``make system-deps`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from .gunicorn import ROOT, free_port, start_gunicorn, stop_process, wait_for_port
from .http_client import cookie_header, create_request, logged_in_session

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "docs" / "nginx.conf.example"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BODY_TIMEOUT = 1.0
# The test stands in for TLS terminated at nginx: the app must see https.
PUBLIC_HOST = "chat.example.test"


def nginx_or_skip() -> str:
    if os.path.exists(NGINX):
        return NGINX
    message = f"nginx not found at {NGINX}: run `make system-deps`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def render_config(tmp: Path, listen_port: int, upstream_port: int) -> Path:
    """The docs' config, made runnable by an unprivileged test process."""
    text = EXAMPLE.read_text()
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{listen_port};",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
        # TLS ends at nginx in production; here $scheme is http, so say https.
        "X-Forwarded-Proto $scheme;": "X-Forwarded-Proto https;",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    head = f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
    temp_paths = "".join(
        f"    {name}_temp_path {tmp}/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = head + text.replace("http {\n", f"http {{\n    access_log off;\n{temp_paths}", 1)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


@contextmanager
def start_nginx(tmp: Path, upstream_port: int) -> Iterator[str]:
    nginx = nginx_or_skip()
    port = free_port()
    conf = render_config(tmp, port, upstream_port)
    log = (tmp / "nginx.out").open("wb")
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        try:
            wait_for_port(port, proc, timeout=15)
        except (RuntimeError, TimeoutError) as exc:
            detail = (tmp / "nginx.out").read_text(errors="replace")
            message = f"nginx did not start: {exc}\n{detail}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGTERM is nginx's fast shutdown; stop_process falls back to SIGKILL.
        stop_process(proc, timeout=10)
        log.close()


def first_delta_seconds(session: requests.Session, url: str) -> float:
    """Seconds from sending a stream request to its first text delta."""
    started = time.monotonic()
    response = session.post(
        f"{url}/chatkit",
        json=create_request("words=30 delay=0.05"),
        stream=True,
        timeout=30,
    )
    try:
        assert response.status_code == 200
        for line in response.iter_lines(chunk_size=1):
            if b"assistant_message.content_part.text_delta" in line:
                return time.monotonic() - started
        raise AssertionError("no text delta")
    finally:
        response.close()


def slow_post(port: int, cookie: str, body: bytes, seconds: float) -> bytes:
    """POST ``body`` a few bytes at a time over ``seconds``; the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(
            (
                f"POST /chatkit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Cookie: {cookie}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        pieces = 10
        step = max(1, len(body) // pieces)
        for start in range(0, len(body), step):
            time.sleep(seconds / pieces)
            try:
                sock.sendall(body[start : start + step])
            except OSError:  # the server answered and closed early (408)
                break
        received = b""
        deadline = time.monotonic() + 20
        while b"\r\n" not in received and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        sock.close()


def test_nginx_in_front_streams_unbuffered_absorbs_slow_bodies_and_forwards_headers(
    tmp_path: Path,
) -> None:
    nginx_or_skip()
    env = {"CHATKIT_BODY_TIMEOUT": f"{BODY_TIMEOUT:g}", "CHATKIT_TEST_PROXY_FIX": "1"}
    with (
        # gunicorn itself trusts X-Forwarded-Proto from loopback peers; trusting a
        # TEST-NET address only leaves the forwarded headers to the app's ProxyFix.
        start_gunicorn(
            tmp_path, env=env, extra_args=["--forwarded-allow-ips", "192.0.2.1"]
        ) as server,
        start_nginx(tmp_path, server.port) as proxied,
    ):
        direct_session = logged_in_session(server.url, "alice")
        proxy_session = logged_in_session(proxied, "alice")

        # 1. Streams arrive unbuffered: the first delta through nginx is no more
        #    than 50 ms behind the direct connection (medians of 7, interleaved).
        direct, via_proxy = [], []
        for _ in range(7):
            direct.append(first_delta_seconds(direct_session, server.url))
            via_proxy.append(first_delta_seconds(proxy_session, proxied))
        lag = statistics.median(via_proxy) - statistics.median(direct)
        assert lag <= 0.050, (direct, via_proxy)

        # 2. Slow bodies are absorbed by nginx: sent over 2.5 s, longer than the
        #    app's body timeout, directly it is a 408; through nginx the app gets
        #    the whole body at once and answers.
        body = json.dumps(
            {"type": "threads.list", "params": {"limit": 5, "order": "desc"}}
        ).encode()
        body += b" " * 200  # JSON allows trailing whitespace: more pieces to trickle
        direct_head = slow_post(server.port, cookie_header(direct_session), body, 2.5)
        assert direct_head.startswith(b"HTTP/1.1 408"), direct_head[:200]
        proxy_port = int(proxied.rsplit(":", 1)[1])
        proxied_head = slow_post(proxy_port, cookie_header(proxy_session), body, 2.5)
        assert proxied_head.startswith(b"HTTP/1.1 200"), proxied_head[:300]

        # 3. Proxy headers are honoured: with TLS ending at nginx, the app's own
        #    origin is https://<public host>, so that browser origin passes the
        #    Origin check through nginx, and the same request sent directly (the
        #    app sees plain http) is refused.
        #    (requests matches cookies against the Host header: send it by hand.)
        headers = {
            "Host": PUBLIC_HOST,
            "Origin": f"https://{PUBLIC_HOST}",
            "Cookie": cookie_header(proxy_session),
        }
        listing = {"type": "threads.list", "params": {}}
        through = requests.post(f"{proxied}/chatkit", json=listing, headers=headers, timeout=30)
        assert through.status_code == 200, through.text
        around = requests.post(f"{server.url}/chatkit", json=listing, headers=headers, timeout=30)
        assert around.status_code == 403, around.text
