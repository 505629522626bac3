"""Print ``name[extras]==X`` for each dependency's lower bound in pyproject.toml.

``make test-min`` installs exactly these (runtime dependencies and every extra except
``dev``), so the unit tests run against the oldest versions pyproject.toml claims to
support, not merely something near them. A dependency without a ``>=`` bound is an
error: every bound must be tested. Markers are evaluated for the target Python.
Usage: ``python scripts/lower_bounds.py [X.Y]`` (default: the running Python).
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
NOT_TESTED_AT_LOWEST = {"dev"}  # tools for this repo's own tests, installed at their newest


def lower_bounds(python_version: str) -> list[str]:
    environment = {
        **default_environment(),
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for extra, extra_specs in project.get("optional-dependencies", {}).items():
        if extra not in NOT_TESTED_AT_LOWEST:
            specs += extra_specs
    pins: dict[str, str] = {}
    for spec in specs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            raise SystemExit(f"pyproject.toml: {spec!r} needs exactly one '>=' lower bound")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        name = req.name.lower()
        if name in pins and pins[name] != f"{name}{extras}=={lows[0]}":
            raise SystemExit(f"pyproject.toml: {name} has two different lower bounds")
        pins[name] = f"{name}{extras}=={lows[0]}"
    return sorted(pins.values())


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ".".join(platform.python_version_tuple()[:2])
    print("\n".join(lower_bounds(target)))
