"""Upload one file as ``multipart/form-data`` from a process of its own.

``python -m tests.upload_client URL FILE [COOKIE]`` writes ``ready`` to stderr and
waits for a line on stdin (so several can be started first and released together,
see :func:`wait_started` and :func:`release`), then POSTs FILE
(field ``file``, type ``application/octet-stream``) to URL, streaming it in
256 KiB writes, and prints the HTTP status. Timing tests run their uploads this way so the uploads
cost the measuring process no GIL time (and need nothing outside Python).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

CHUNK = 256 * 1024


def upload(url: str, path: str, cookie: str = "", timeout: float = 300) -> int:
    parts = urlsplit(url)
    boundary = uuid.uuid4().hex
    name = os.path.basename(path)
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + os.path.getsize(path) + len(tail)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest("POST", parts.path or "/")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(length))
        if cookie:
            conn.putheader("Cookie", cookie)
        conn.endheaders()
        conn.send(head)
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK):
                conn.send(chunk)
        conn.send(tail)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def start_uploads(url: str, path: str, count: int, cookie: str = "") -> list[Any]:
    """``count`` uploader processes, started and waiting; see :func:`release`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.upload_client", url, path, cookie],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=root,
            # Clients stand for other machines: on 2 cores they must not preempt the
            # server whose stream is being timed.
            preexec_fn=lambda: os.nice(19),
        )
        for _ in range(count)
    ]


def wait_started(procs: list[Any]) -> None:
    """Until every uploader's interpreter runs and waits for its ``go`` (each writes
    ``ready`` to stderr first): released then, they all start at once. A process that
    died instead ends its stderr, so this never hangs on it."""
    for proc in procs:
        line = proc.stderr.readline()
        assert line == b"ready\n", (line, proc.poll())


def release(procs: list[Any], timeout: float = 300) -> list[int]:
    """Let the waiting uploaders go at once; their HTTP statuses when all are done.

    One deadline for all; an uploader still running at it (or on any failure here)
    is killed, never left behind."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        return [
            int(proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0] or 0)
            for proc in procs
        ]
    finally:
        stop_all(procs)


def stop_all(procs: list[Any]) -> None:
    """Kill every uploader still running and reap it."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


if __name__ == "__main__":
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.readline()
    cookie = sys.argv[3] if len(sys.argv) > 3 else ""
    print(upload(sys.argv[1], sys.argv[2], cookie))
