"""A real S3-compatible server for the tests (a pytest plugin: ``pytest_plugins = ["tests.s3"]``).

``s3_server`` starts moto's standalone server (``python -m moto.server``, from the
``moto[server]`` dev dependency) as its own process on a free loopback port,
once per session; boto3 talks to it over HTTP exactly as it would to AWS or
MinIO. Nothing is patched in-process. ``s3_env`` points boto3's standard
configuration at it (``AWS_ENDPOINT_URL_S3`` …) and ``s3_bucket`` gives each
test an empty bucket of its own. When the server cannot start, the S3 tests
are skipped LOUDLY (under ``CI=true`` they fail: tests/components.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from .components import unavailable
from .gunicorn import free_port, stop_process


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self) -> str:
        name = f"chatkit-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        answer = self.client().list_objects_v2(Bucket=bucket)
        return sorted(entry["Key"] for entry in answer.get("Contents", []))


def start_s3_server(
    log_dir: Path, timeout: float = 60.0, extra_env: dict[str, str] | None = None
) -> S3Server:
    """``python -m moto.server`` on 127.0.0.1:<free port>; waits until it answers.

    ``extra_env`` configures moto itself, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=N``:
    after N requests it checks credentials (and refuses unknown ones)."""
    port = free_port()
    log_path = log_dir / f"moto-{port}.log"
    endpoint = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(extra_env or {})},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}: {log_path.read_text()}")
        try:
            # moto's own API: answered without credentials, counted as no S3 action
            if requests.get(f"{endpoint}/moto-api/data.json", timeout=1).status_code < 500:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        stop_process(proc)
        raise TimeoutError(f"moto server did not answer on {endpoint} within {timeout}s")
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "chatkit-test",
        "AWS_SECRET_ACCESS_KEY": "chatkit-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    return S3Server(endpoint, proc, log_path, env)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import boto3  # noqa: F401
    except ImportError:
        unavailable("the S3 server (moto)", "boto3 is not installed (pip install -e '.[dev]')")
    try:
        server = start_s3_server(tmp_path_factory.mktemp("s3"))
    except (OSError, RuntimeError, TimeoutError) as exc:
        unavailable("the S3 server (moto)", f"moto's S3 server could not start: {exc}")
    try:
        yield server
    finally:
        stop_process(server.proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3's standard configuration (environment) pointed at the test server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_env: dict[str, str]) -> str:
    """An empty bucket of this test's own."""
    return s3_server.create_bucket()
