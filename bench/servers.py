"""Start the benchmark's hosts as subprocesses on free loopback ports.

``flask``          flask-chatkit under ``gunicorn -k gevent``, 1 worker
``uvicorn-fixed``  the baseline: FastAPI under uvicorn[standard] (``--loop uvloop
                   --http httptools``), 1 worker, ChatKit's TypeAdapter cached (the
                   same SDK fix flask-chatkit has)
``uvicorn``        the same, ChatKit SDK as shipped (an extra row, never the headline)
``floor``          plain Flask under ``gunicorn -k gevent``, 1 worker (no ChatKit)
"""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import gunicorn

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOSTS = ("flask", "uvicorn", "uvicorn-fixed", "floor")
CHATKIT_PATH = {"flask": "/chatkit", "uvicorn": "/chatkit", "uvicorn-fixed": "/chatkit"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_nofile() -> None:  # runs in the child before exec
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    db_path: Path | None

    def worker_pid(self) -> int:
        """The process that serves requests: gunicorn's worker, uvicorn itself."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        if self.name in ("flask", "floor") and out:
            return int(out[0])
        return self.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time the serving process has used, all its threads.

        From each thread's ``schedstat`` (nanoseconds): the process's ``utime`` and
        ``stime`` count 10 ms ticks, ±2.5% of a 100-stream round of section B. The
        ticks are the answer only where ``schedstat`` is missing: they also hold the
        time of threads that have exited, which the sum below would lose (the hosts
        here keep their threads for their lifetime).
        """
        pid = self.worker_pid()
        total = 0
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except FileNotFoundError:  # the thread exited meanwhile
                    continue
            return total / 1e9
        except (FileNotFoundError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def _command(name: str, port: int, tmp: Path) -> list[str]:
    if name in ("flask", "floor"):
        app = "bench.apps:flask_app()" if name == "flask" else "bench.apps:floor_app()"
        # An empty config: the project's gunicorn.conf.py (access log, 2 workers) stays out.
        config = tmp / "gunicorn.conf.py"
        config.write_text("")
        args = [
            str(BIN / "gunicorn"), "-c", str(config), "-k", "gevent", "-w", "1",
            "--bind", f"127.0.0.1:{port}", "--backlog", "4096",
            "--worker-connections", "5000", "--timeout", "120", "--graceful-timeout", "3",
            "--keep-alive", "5", "--log-level", "warning",
        ]
        if gunicorn.version_info >= (27,):
            args.append("--no-control-socket")
        return [*args, app]
    return [
        sys.executable, "-m", "uvicorn", "bench.apps:fastapi_app", "--factory",
        "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
        # uvicorn's strongest configuration: the C event loop and parser.
        "--loop", "uvloop", "--http", "httptools",
        "--log-level", "warning", "--backlog", "4096",
    ]


def _wait_ready(
    name: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    """Until the app answers (gunicorn's master listens before its worker has booted)."""
    path, body = ("/hello", b"{}") if name == "floor" else (
        "/chatkit", b'{"type":"threads.list","params":{"limit":1}}'
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise TimeoutError(f"{name} did not answer on {port} within {timeout}s:\n{log.read_text()}")


@contextmanager
def run_server(
    name: str, store_delay: float = 0.0, db_url: str | None = None
) -> Iterator[Server]:
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        port = free_port()
        log_path = Path(tmp) / "server.log"
        db_path = Path(tmp) / "chatkit.sqlite3"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BENCH_DB": str(db_path),
            "BENCH_DB_URL": db_url or "",  # a database of its own per host (PostgreSQL)
            "BENCH_STORE_DELAY": str(store_delay),
            "BENCH_FIX_ADAPTER": "1" if name == "uvicorn-fixed" else "0",
        }
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                _command(name, port, Path(tmp)), cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,  # before any thread is started
            )
        try:
            _wait_ready(name, port, proc, log_path)
            yield Server(name, port, proc, log_path, db_path if name != "floor" else None)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@contextmanager
def run_servers(
    names: list[str], store_delay: float = 0.0, db_urls: dict[str, str] | None = None
) -> Iterator[dict[str, Server]]:
    """``db_urls`` gives a host its database URL (default: a temp SQLite file of its own)."""
    urls = db_urls or {}
    with ExitStack() as stack:
        yield {n: stack.enter_context(run_server(n, store_delay, urls.get(n))) for n in names}
