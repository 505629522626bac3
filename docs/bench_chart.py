"""Draw the benchmark charts of the docs from ``bench/RESULTS.md`` (written by ``make bench``).

Run by ``docs/conf.py`` at every build, or by hand:
``python docs/bench_chart.py bench/RESULTS.md docs/_generated``. The charts are plain SVG
written here (no plotting library), so they come from the data of the last bench run and
never from numbers typed into the docs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

SUMMARY_HEADING = "## Summary"
COLUMNS = ("test", "flask-chatkit", "baseline", "ratio", "target", "met")
STREAMS_ROW = re.compile(r"^B (\d+) streams: TTFE p99 ms")

FONT = "font-family='system-ui, sans-serif' font-size='12'"
GOOD, BAD, PEER, OURS = "#2f7d32", "#c62828", "#607d8b", "#1565c0"


@dataclass(frozen=True)
class Row:
    test: str
    flask: str
    baseline: str
    ratio: str
    target: str
    met: str


def summary_rows(results_md: str) -> list[Row]:
    """The rows of the ``## Summary`` table of a RESULTS.md."""
    lines = results_md.splitlines()
    start = lines.index(SUMMARY_HEADING)
    rows: list[Row] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or cells[0] == COLUMNS[0] or set(cells[0]) <= {"-"}:
            continue
        rows.append(Row(*cells))
    if not rows:
        raise ValueError("bench/RESULTS.md has no rows in its Summary table")
    return rows


def number(text: str) -> float:
    """``"1,258"``, ``"0.85x"``, ``"**no**"``-free numbers as floats."""
    return float(text.replace(",", "").rstrip("x%").strip())


def oriented_ratio(row: Row) -> float:
    """The row's ratio turned so that > 1 always means flask-chatkit does better.

    A target of the form ``≤ 1.0x`` marks a cost (CPU, memory): its ratio is
    flask/baseline, so its inverse is used.
    """
    ratio = number(row.ratio)
    return 1.0 / ratio if row.target.startswith("≤") else ratio


def target_value(row: Row) -> float | None:
    found = re.search(r"([0-9.]+)x", row.target)
    if not found:
        return None
    value = float(found.group(1))
    return 1.0 / value if row.target.startswith("≤") else value


def ratio_chart(rows: list[Row]) -> str:
    """Horizontal bars: every target row of the summary, as "times the baseline"."""
    rows = [r for r in rows if r.target not in ("info", "") and r.ratio not in ("—", "-")]
    label_w, bar_w, row_h, top = 430, 360, 22, 40
    scale_max = max(2.0, *(oriented_ratio(r) for r in rows)) * 1.1
    width, height = label_w + bar_w + 70, top + row_h * len(rows) + 40

    def x(value: float) -> float:
        return label_w + bar_w * value / scale_max

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' {FONT}>",
        "<title>flask-chatkit against the baseline, by benchmark (higher is better)</title>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='{label_w}' y='18' font-weight='bold'>times the baseline "
        "(FastAPI/uvicorn + fix); higher is better</text>",
    ]
    for i, row in enumerate(rows):
        y = top + i * row_h
        value = oriented_ratio(row)
        colour = GOOD if row.met == "yes" else BAD
        out.append(
            f"<text x='{label_w - 8}' y='{y + 14}' text-anchor='end'>{escape(row.test)}</text>"
        )
        out.append(
            f"<rect x='{label_w}' y='{y + 3}' width='{x(value) - label_w:.1f}' "
            f"height='{row_h - 6}' fill='{colour}'/>"
        )
        target = target_value(row)
        label_x = max(x(value), x(target if target is not None else 0.0), x(1.0)) + 5
        out.append(f"<text x='{label_x:.1f}' y='{y + 14}'>{value:.2f}&#215;</text>")
        if target is not None:
            out.append(
                f"<line x1='{x(target):.1f}' x2='{x(target):.1f}' y1='{y + 1}' "
                f"y2='{y + row_h - 1}' stroke='black' stroke-width='2'/>"
            )
    bottom = top + row_h * len(rows)
    out.append(
        f"<line x1='{x(1.0):.1f}' x2='{x(1.0):.1f}' y1='{top - 4}' y2='{bottom + 4}' "
        "stroke='#444' stroke-dasharray='4 3'/>"
    )
    out.append(
        f"<text x='{x(1.0):.1f}' y='{bottom + 18}' text-anchor='middle'>1&#215; (even)</text>"
    )
    out.append(
        f"<text x='{label_w}' y='{bottom + 34}'>green: target met · red: not met · "
        "black tick: the target</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def streams_chart(rows: list[Row]) -> str:
    """Grouped bars: time to first event (p99) by number of concurrent streams."""
    points = []
    for row in rows:
        found = STREAMS_ROW.match(row.test)
        if found:
            points.append((int(found.group(1)), number(row.flask), number(row.baseline)))
    if not points:
        raise ValueError("bench/RESULTS.md has no 'B <n> streams: TTFE p99 ms' rows")
    left, top, plot_h, group_w, bar_w = 70, 40, 220, 120, 40
    width, height = left + group_w * len(points) + 20, top + plot_h + 70
    peak = max(max(f, b) for _, f, b in points) * 1.1

    def h(value: float) -> float:
        return plot_h * value / peak

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' {FONT}>",
        "<title>Time to first event, p99, by concurrent streams (lower is better)</title>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='{left}' y='18' font-weight='bold'>time to first event, p99 (ms); "
        "lower is better</text>",
        f"<line x1='{left}' x2='{left}' y1='{top}' y2='{top + plot_h}' stroke='#444'/>",
        f"<line x1='{left}' x2='{width - 10}' y1='{top + plot_h}' y2='{top + plot_h}' "
        "stroke='#444'/>",
    ]
    for i, (streams, flask, baseline) in enumerate(points):
        gx = left + 10 + i * group_w
        for j, (value, colour) in enumerate(((flask, OURS), (baseline, PEER))):
            bx, bh = gx + j * (bar_w + 4), h(value)
            out.append(
                f"<rect x='{bx}' y='{top + plot_h - bh:.1f}' width='{bar_w}' "
                f"height='{bh:.1f}' fill='{colour}'/>"
            )
            out.append(
                f"<text x='{bx + bar_w / 2}' y='{top + plot_h - bh - 4:.1f}' "
                f"text-anchor='middle'>{value:,.0f}</text>"
            )
        out.append(
            f"<text x='{gx + bar_w + 2}' y='{top + plot_h + 16}' text-anchor='middle'>"
            f"{streams} streams</text>"
        )
    legend_y = top + plot_h + 40
    out.append(f"<rect x='{left}' y='{legend_y - 10}' width='12' height='12' fill='{OURS}'/>")
    out.append(f"<text x='{left + 16}' y='{legend_y}'>flask-chatkit (gunicorn -k gevent)</text>")
    out.append(f"<rect x='{left + 250}' y='{legend_y - 10}' width='12' height='12' fill='{PEER}'/>")
    out.append(f"<text x='{left + 266}' y='{legend_y}'>FastAPI/uvicorn + fix</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_charts(results: Path, out_dir: Path) -> list[Path]:
    rows = summary_rows(results.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    charts = {"bench-ratios.svg": ratio_chart(rows), "bench-ttfe.svg": streams_chart(rows)}
    for name, svg in charts.items():
        path = out_dir / name
        path.write_text(svg, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_charts(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
