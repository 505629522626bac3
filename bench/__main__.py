"""``python -m bench``: flask-chatkit vs FastAPI/uvicorn, printed as markdown.

    python -m bench             # the full run (< 15 minutes), writes bench/RESULTS.md
    python -m bench --quick     # smoke test: small N, short runs
    python -m bench --only A,C  # a selection (A-E; P PostgreSQL, F store, S sync stall, U uploads)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .sections import SECTIONS, Section, Settings, Summary

HERE = Path(__file__).resolve().parent


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = []
    for dist in ("flask-chatkit", "openai-chatkit", "flask", "gunicorn", "gevent", "fastapi",
                 "uvicorn", "uvloop", "httptools", "starlette", "pydantic", "sqlalchemy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} CPUs (`nproc`), {cpu}; load average at start {load}",
        f"- Python {platform.python_version()} on {platform.system()} {platform.release()}",
        "- versions: " + ", ".join(versions),
        "- servers: one process/worker each on 127.0.0.1; gunicorn `-k gevent -w 1`; "
        "uvicorn `--workers 1 --loop uvloop --http httptools`; each ChatKit host on its own "
        "temp SQLite file (SQLAlchemyStore)",
        "- baseline of every ratio: FastAPI on uvicorn[standard] with ChatKit's per-request "
        "TypeAdapter cached, the same SDK fix flask-chatkit has (`uvicorn-fixed`); the SDK "
        "as shipped appears only as an extra row",
    ]


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def summary_table(summaries: list[Summary]) -> str:
    rows = []
    for s in summaries:
        met = "—" if s.met is None else ("yes" if s.met else "**no**")
        rows.append([s.test, s.flask, s.baseline,
                     "—" if s.ratio is None else f"{s.ratio:.2f}x", s.target, met])
    return fmt_table(["test", "flask-chatkit", "baseline", "ratio", "target", "met"], rows)


# -- sections that live in modules of their own ----------------------------------
# F: the store (bench/store_bench.py), S: a blocking call's stall on a neighbour stream
# (bench/sync_stall.py), U: uploads, disk vs S3 (bench/uploads.py).


def module_section(key: str, title: str, module_name: str) -> Callable[[Settings], Section]:
    def section(cfg: Settings) -> Section:
        return _run_module(key, title, module_name, cfg)

    return section


def _run_module(key: str, title: str, module_name: str, cfg: Settings) -> Section:
    section = Section(key, title, ["result"])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        section.rows.append([f"not available ({exc})"])
        return section
    runner = None
    for name in ("run_store_bench", "run", "store_bench", "main_rows"):
        if callable(getattr(module, name, None)):
            runner = getattr(module, name)
            break
    if runner is None:
        section.rows.append([f"not available ({module_name} has no run function)"])
        return section
    try:
        try:
            result = runner(quick=cfg.quick)
        except TypeError:
            result = runner()
    except Exception as exc:
        section.rows.append([f"failed: {type(exc).__name__}: {exc}"])
        return section
    if isinstance(result, str):
        section.headers = []
        section.notes.append(result)
        return section
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], list | tuple):
        headers, rows = list(result[0]), list(result[1])
    else:
        rows = list(result)
        headers = list(getattr(module, "HEADERS", None) or getattr(module, "COLUMNS", None) or [])
    if rows and isinstance(rows[0], dict):
        headers = list(rows[0])
        rows = [[row.get(h, "") for h in headers] for row in rows]
    if not headers and rows:
        headers = [f"col{i + 1}" for i in range(len(rows[0]))]
    section.headers, section.rows = headers, [list(r) for r in rows]
    return section


ALL = {
    **SECTIONS,
    "F": module_section("F", "F. store benchmark (bench/store_bench.py)", "bench.store_bench"),
    "S": module_section(
        "S", "S. a blocking call in respond: stall added to a neighbour stream "
        "(bench/sync_stall.py)", "bench.sync_stall",
    ),
    "U": module_section(
        "U", "U. uploads: throughput and neighbour-stream jitter, disk vs S3 (bench/uploads.py)",
        "bench.uploads",
    ),
}


def render(sections: list[Section], header: list[str], elapsed: float, quick: bool) -> str:
    parts = ["# flask-chatkit vs FastAPI/uvicorn" + (" (quick mode)" if quick else ""), ""]
    parts += [*header, f"- bench wall time: {elapsed / 60:.1f} min", ""]
    summaries = [s for sec in sections for s in sec.summary]
    if summaries:
        parts += ["## Summary", "", summary_table(summaries), ""]
    for sec in sections:
        parts += [f"## {sec.title}", ""]
        if sec.headers:
            parts += [fmt_table(sec.headers, sec.rows), ""]
        for note in sec.notes:
            parts += [note, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N, short runs")
    parser.add_argument("--only", default="", help="comma-separated sections, e.g. A,C")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per host (default 3; quick 1)")
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio client for A")
    parser.add_argument("--output", default=None,
                        help="markdown file to write (default bench/RESULTS.md; "
                             "quick runs and --only selections are not written unless given)")
    args = parser.parse_args(argv)
    cfg = Settings.quick_mode() if args.quick else Settings()
    if args.rounds:
        cfg.rounds = args.rounds
    cfg.use_wrk = not args.no_wrk
    keys = [k.strip().upper() for k in args.only.split(",") if k.strip()] or list(ALL)
    unknown = [k for k in keys if k not in ALL]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(ALL)}")
    header = machine()
    print("\n".join(header), flush=True)
    started = time.monotonic()
    done: list[Section] = []
    for key in keys:
        t0 = time.monotonic()
        print(f"\n== running {key} ...", file=sys.stderr, flush=True)
        try:
            section = ALL[key](cfg)
        except Exception as exc:
            traceback.print_exc()
            section = Section(key, f"{key}. failed", ["error"], [[f"{type(exc).__name__}: {exc}"]])
        section.notes.append(f"_section time {time.monotonic() - t0:.0f} s_")
        done.append(section)
        print(render([section], [], time.monotonic() - t0, cfg.quick).split("\n", 2)[2],
              flush=True)
    text = render(done, header, time.monotonic() - started, cfg.quick)
    print("\n" + text)
    output = args.output
    if output is None and not args.quick and not args.only:
        output = str(HERE / "RESULTS.md")
    if output:
        Path(output).write_text(text + "\n")
        print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
