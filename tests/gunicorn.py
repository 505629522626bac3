"""Start a real gunicorn on a free loopback port for integration tests."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gunicorn

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
    raise TimeoutError(f"gunicorn did not listen on {port} within {timeout}s")


def wait_until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait for one HTTP answer, whatever its status.

    The master listens before it forks, and a worker imports the app only after the
    fork: ~2.5 s on an idle machine, four times that on a loaded one. A worker calls
    ``accept`` only once its app is loaded, so one answer means the first request a
    test sends is served by a worker that is ready, and the test's own timeouts
    measure the server, not its boot. A master that exits meanwhile (the app failed
    to load) is left for the test to see."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=deadline - time.monotonic())
        try:
            conn.request("GET", "/__test_harness_ready__")
            conn.getresponse().read()
            return
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
        finally:
            conn.close()
    if proc.poll() is None:
        raise TimeoutError(f"gunicorn on {port} did not answer HTTP within {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``.

    A gunicorn master that is SIGKILLed leaves its workers behind (they only notice
    the master is gone at their next check): they are SIGKILLed too, by pid, found
    before the master goes."""
    if proc.poll() is not None:
        return
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a worker that outlived its master


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(child) for child in out.split()]


# The markers of the test being set up (tests/conftest.py sets it): a test that starts
# a real server must carry ``integration``, or test-min (``-m "not integration"``) would
# run it too. None outside pytest (bench/ uses these helpers as well).
current_test_markers: set[str] | None = None


def require_integration_marker() -> None:
    if current_test_markers is not None and "integration" not in current_test_markers:
        raise AssertionError(
            "this test starts a real server: mark it @pytest.mark.integration"
        )


@dataclass
class RunningServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]


@contextmanager
def start_gunicorn(
    tmp_path: Path,
    app_spec: str = "tests.apps:gunicorn_app()",
    env: dict[str, str] | None = None,
    worker_class: str = "gevent",
    workers: int = 1,
    extra_args: list[str] | None = None,
    graceful_timeout: float | None = 5,
    cwd: Path = ROOT,
    executable: str = GUNICORN,
) -> Iterator[RunningServer]:
    """``graceful_timeout=None`` keeps gunicorn's default; a ``cwd`` without a
    ``gunicorn.conf.py`` runs gunicorn with no config file at all. ``cwd`` and
    ``executable`` also serve an app outside the repo (README, installed wheel)."""
    require_integration_marker()
    port = free_port()
    log_path = tmp_path / f"gunicorn-{port}.log"
    args = [
        executable,
        "-k",
        worker_class,
        "-w",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        *(["--graceful-timeout", f"{graceful_timeout:g}"] if graceful_timeout is not None else []),
        "--timeout",
        "60",
        "--worker-connections",
        "4000",
    ]
    if gunicorn.version_info >= (27,):
        args.append("--no-control-socket")  # several servers at once must not share one
    args += [*(extra_args or []), app_spec]
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    child_env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        server = RunningServer(f"http://127.0.0.1:{port}", port, proc, log_path)
        # The master listens before it forks: under load the workers may not exist yet.
        deadline = time.monotonic() + 30
        while len(server.worker_pids()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_until_serving(port, proc)
        yield server
    finally:
        stop_process(proc)


@contextmanager
def start_flask_run(
    tmp_path: Path, app_spec: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``flask --app APP_SPEC run`` (Werkzeug's dev server) on a free port; yields its URL."""
    require_integration_marker()
    port = free_port()
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    args = [sys.executable, "-m", "flask", "--app", app_spec, "run", "--port", str(port)]
    with (tmp_path / "flask.log").open("wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)
