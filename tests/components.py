"""What the suite does when a real component (PostgreSQL, the S3 server, Chromium,
gunicorn) cannot start: skip LOUDLY on a developer's machine, FAIL under CI.

CI is recognised by ``CI`` set to anything but ``""``/``0``/``false`` (GitHub Actions,
GitLab and most others set ``CI=true``). A skipped component there would turn a run
that tested nothing into a green one, so :func:`unavailable` fails the test instead,
and ``pytest_terminal_summary`` (tests/conftest.py) makes the exit status non-zero if
any component skip got through anyway (a module-level skip, an ``importorskip``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import NoReturn

import pytest

# The words every component skip starts with: the session hook finds them in reports.
SKIP_TAG = "COMPONENT UNAVAILABLE"


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(component: str, reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip (loudly) or, under CI, fail: ``component`` cannot be started here."""
    message = f"{SKIP_TAG}: {component}: {reason.strip()}"
    print(f"\n!!!!! {message} !!!!!\n", file=sys.__stderr__, flush=True)
    if under_ci():
        pytest.fail(f"{message} (CI is set: a component that cannot start fails the run)",
                    pytrace=False)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message, allow_module_level=allow_module_level)
