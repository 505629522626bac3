"""The demo with ``OTEL_TRACES_EXPORTER=console``: a chat turn's spans printed to stdout.

Run in a subprocess: OpenTelemetry's global providers can be set once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .gunicorn import ROOT

SCRIPT = """
import sys
from opentelemetry import trace
from example import create_app
from flask_chatkit.testing import ChatKitClient
from tests.test_example import login

app = create_app({"TESTING": True, "SECRET_KEY": "t", "DEMO_WORD_DELAY": 0},
                 instance_path=sys.argv[1])
client = app.test_client()
login(client)
ChatKitClient(client).create_thread("hello")
getattr(trace.get_tracer_provider(), "force_flush", lambda: None)()
"""


def run_demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    child_env.pop("OPENAI_API_KEY", None)  # the offline responder
    child_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "instance")],
        cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=60,
    )


def test_console_exporter_prints_the_chat_turn(tmp_path: Path) -> None:
    out = run_demo(tmp_path, OTEL_TRACES_EXPORTER="console")
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"name": "chatkit threads.create"' in out.stdout
    assert '"name": "POST /chatkit"' in out.stdout  # the Flask server span around it
    assert '"chatkit.outcome": "finished"' in out.stdout

