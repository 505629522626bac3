"""The built wheel works outside the repo.

Built (sdist, then the wheel from the sdist; no setuptools deprecation warning), installed
into a fresh venv in a temp dir (uv), it serves the README Quickstart as ``app.py`` from
that venv's own ``gunicorn -k gevent``: the console loads and one chat streams.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from .gunicorn import ROOT, start_gunicorn
from .readme_blocks import chat_over_http, quickstart_code

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)


def run(args: list[str | Path], cwd: Path, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_wheel_installs_and_serves_outside_the_repo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # `uv build`: the same setuptools backend and sdist-then-wheel path as `make dist`
    # (`python -m build`), with a cached build env: 3 s instead of 20.
    build_log = run([BIN / "uv", "build", "--out-dir", dist, ROOT], tmp_path, 300)
    assert not DEPRECATION.findall(build_log), build_log  # e.g. license as a TOML table
    wheels = list(dist.glob("flask_chatkit-*-py3-none-any.whl"))
    assert len(wheels) == 1 and len(list(dist.glob("flask_chatkit-*.tar.gz"))) == 1

    venv = tmp_path / "venv"
    run([BIN / "uv", "venv", "-q", "--python", sys.executable, venv], tmp_path, 120)
    python = venv / "bin" / "python"
    # --compile-bytecode as pip does: else the worker's first imports compile for seconds.
    install = [BIN / "uv", "pip", "install", "-q", "--compile-bytecode", "--python", python]
    run([*install, wheels[0]], tmp_path, 600)
    where = run([python, "-c", "import flask_chatkit; print(flask_chatkit.__file__)"], tmp_path, 60)
    assert where.strip().startswith(str(venv)), where  # the wheel, not the checkout
    licenses = list(
        venv.glob("lib/python*/site-packages/flask_chatkit-*.dist-info/licenses/LICENSE")
    )
    assert licenses and "MIT License" in licenses[0].read_text()

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(quickstart_code())
    init = run([venv / "bin" / "flask", "--app", "app", "chatkit", "init-db"], app_dir, 60)
    assert "chatkit_threads" in init
    env = {"PYTHONPATH": str(app_dir)}
    with start_gunicorn(
        tmp_path, "app:app", env=env, cwd=app_dir, executable=str(venv / "bin" / "gunicorn")
    ) as server:
        # The first request waits for the worker to boot (imports), hence the generous timeout.
        console = requests.get(f"{server.url}/chatkit/console", timeout=60)
        assert console.status_code == 200
        assert "text/html" in console.headers["Content-Type"] and "<html" in console.text.lower()
        text, arrivals = chat_over_http(server.url, "wheel-user", "from the wheel")
        assert text == "Hello wheel-user, you said: from the wheel"
        assert len(arrivals) == len(text.split())
        assert "Traceback" not in server.log()
