"""A lean HTTP/1.1 load client on raw asyncio streams (127.0.0.1 only).

Two cores are shared by client and server, so the client parses as little as it
can: Content-Length and chunked bodies, nothing else. ``wrk`` is used for the
request-rate test when it is available (see :func:`wrk_rate`).
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
DELTA = b'"type":"thread.item.updated"'
DONE = b'"type":"thread.item.done"'
THREAD_ID = re.compile(rb'"type":"thread\.created","thread":\{[^{}]*?"id":"([^"]+)"')


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def chatkit_body(kind: str, **params: object) -> bytes:
    return json.dumps({"type": kind, "params": params}, separators=(",", ":")).encode()


def create_body(text: str) -> bytes:
    return chatkit_body(
        "threads.create",
        input={"content": [{"type": "input_text", "text": text}], "attachments": [],
               "inference_options": {}},
    )


def request_bytes(path: str, body: bytes, keep_alive: bool = True) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}"
        "\r\n\r\n"
    ).encode() + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _iter_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]):  # type: ignore[no-untyped-def]
    """Yield body pieces as they arrive (Content-Length, chunked, or until EOF)."""
    if b"content-length" in headers:
        yield await reader.readexactly(int(headers[b"content-length"]))
        return
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    while data := await reader.read(65536):
        yield data


async def request(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request_bytes(path, body, keep_alive=False))
        status, headers = await _read_head(reader)
        parts = [piece async for piece in _iter_body(reader, headers)]
        return status, b"".join(parts)
    finally:
        writer.close()


# -- request rate (non-streaming) ------------------------------------------------


@dataclass
class RateResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    tool: str = "asyncio"

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _rate_conn(port: int, payload: bytes, stop: float, out: RateResult) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.monotonic() < stop:
            writer.write(payload)
            status, headers = await _read_head(reader)
            async for _ in _iter_body(reader, headers):
                pass
            if status == 200:
                out.requests += 1
            else:
                out.errors += 1
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        out.errors += 1
    finally:
        writer.close()


async def asyncio_rate(
    port: int, path: str, body: bytes, concurrency: int, seconds: float
) -> RateResult:
    out = RateResult()
    payload = request_bytes(path, body)
    start = time.monotonic()
    await asyncio.gather(
        *(_rate_conn(port, payload, start + seconds, out) for _ in range(concurrency))
    )
    out.seconds = time.monotonic() - start
    return out


def ensure_wrk() -> str | None:
    """``wrk`` on PATH; installed with apt-get (as root) only when absent."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        subprocess.run([apt, "install", "-y", "-q", "wrk"], capture_output=True, timeout=180,
                       check=False)
    return shutil.which("wrk")


def wrk_rate(
    wrk: str, port: int, path: str, body: bytes, concurrency: int, seconds: float
) -> RateResult:
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "post.lua"
        lua.write_text(script)
        proc = subprocess.run(
            [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
             "-s", str(lua), f"http://{HOST}:{port}{path}"],
            capture_output=True, text=True, timeout=seconds + 30, check=False,
        )
    text = proc.stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    if total is None:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    secs = float(total.group(2)) / (1000 if total.group(3) == "ms" else 1)
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors += int(m.group(1))
    socket_errors = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
    if m := re.search(socket_errors, text):
        errors += sum(int(g) for g in m.groups())
    good = int(total.group(1)) - errors
    return RateResult(requests=max(good, 0), errors=errors, seconds=secs, tool="wrk")


# -- streams ---------------------------------------------------------------------


@dataclass
class StreamResult:
    status: int = 0
    error: str | None = None
    ttfe: float | None = None  # seconds from connect to the first SSE event
    seconds: float = 0.0  # connect to end of stream
    first_delta: float | None = None  # seconds from connect to the first text delta
    last_delta: float | None = None  # ... and to the last
    deltas: int = 0
    done: bool = False
    thread_id: str | None = None
    raw: bytearray = field(default_factory=bytearray, repr=False)


async def stream(
    port: int,
    path: str,
    body: bytes,
    *,
    timeout: float,
    abort_after_deltas: int | None = None,
    on_first: Callable[[], None] | None = None,
    hold: asyncio.Event | None = None,
) -> StreamResult:
    """POST and read an SSE stream to its end (or abort it with a TCP RST).

    ``abort_after_deltas``: reset the connection after that many text deltas.
    ``on_first`` is called at the first event; with ``hold`` the stream then
    stays open, unread, until ``hold`` is set, and is reset.
    """
    out = StreamResult()
    start = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request_bytes(path, body, keep_alive=False))
            out.status, headers = await _read_head(reader)
            async for piece in _iter_body(reader, headers):
                if out.ttfe is None and b"data:" in piece:
                    out.ttfe = time.monotonic() - start
                    if on_first is not None:
                        on_first()
                    if hold is not None:
                        await hold.wait()
                        _reset(writer)
                        writer = None
                        break
                out.raw += piece
                if DELTA in piece:
                    out.last_delta = time.monotonic() - start
                    if out.first_delta is None:
                        out.first_delta = out.last_delta
                if abort_after_deltas is not None and out.raw.count(DELTA) >= abort_after_deltas:
                    _reset(writer)
                    writer = None
                    break
    except TimeoutError:
        out.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.error = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    out.seconds = time.monotonic() - start
    out.deltas = out.raw.count(DELTA)
    out.done = DONE in out.raw
    if m := THREAD_ID.search(out.raw):
        out.thread_id = m.group(1).decode()
    if out.status and out.status != 200 and out.error is None:
        out.error = f"HTTP {out.status}"
    return out


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close abruptly: SO_LINGER 0 makes close() send a RST."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
