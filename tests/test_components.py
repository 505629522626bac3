"""Under ``CI=true`` a real component that cannot start fails the run (tests/components.py).

Each case runs a small pytest session of its own in a subprocess, with the suite's
conftest loaded as a plugin, and reads its exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBES = {
    # the fixtures' way: tests.components.unavailable()
    "helper": (
        "from tests.components import unavailable\n"
        "def test_needs_postgres():\n"
        "    unavailable('PostgreSQL', 'initdb not found')\n"
    ),
    # a plain module-level skip tagged as a component skip (what importorskip-like code does)
    "module_skip": (
        "import pytest\n"
        "from tests.components import SKIP_TAG\n"
        "pytest.skip(f'{SKIP_TAG}: Chromium: missing', allow_module_level=True)\n"
        "def test_never_collected():\n"
        "    pass\n"
    ),
    # a tagged skip next to a passing test: the session would otherwise exit 0
    "skip_beside_pass": (
        "import pytest\n"
        "from tests.components import SKIP_TAG\n"
        "def test_passes():\n"
        "    assert True\n"
        "def test_s3():\n"
        "    pytest.skip(f'{SKIP_TAG}: the S3 server (moto): did not answer')\n"
    ),
}


def run_probe(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_probe.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-c", os.devnull,
         "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_under_ci_an_unavailable_component_fails_the_run(tmp_path: Path, probe: str) -> None:
    result = run_probe(tmp_path, PROBES[probe], ci="true")
    assert result.returncode not in (0, 5), result.stdout[-3000:]
    assert "COMPONENT UNAVAILABLE" in result.stdout + result.stderr


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_off_ci_it_is_a_loud_skip(tmp_path: Path, probe: str) -> None:
    result = run_probe(tmp_path, PROBES[probe], ci=None)
    assert result.returncode in (0, 5), result.stdout[-3000:]
    assert "COMPONENT UNAVAILABLE" in result.stdout + result.stderr


def test_ci_switched_off_explicitly_skips(tmp_path: Path) -> None:
    result = run_probe(tmp_path, PROBES["helper"], ci="false")
    assert result.returncode == 0, result.stdout[-3000:]
