#!/usr/bin/env python3
"""Render a PNG preview of each Grafana dashboard's layout: every panel's title, type and metrics in its
grid position (Grafana's 24-column grid), rows as bands. Grafana cannot run here; this shows a reader what
the chart's dashboards look like without installing it.

    .venv/bin/pip install -e '.[docs]'     # matplotlib
    .venv/bin/python scripts/render-dashboard-previews.py [--out docs/dashboards] [DASHBOARD.json ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "helm" / "switchyard" / "dashboards"
OUT = REPO / "docs" / "dashboards"

COLUMNS = 24
COLUMN_PX = 64  # Grafana at ~1550 px wide: one of 24 columns
ROW_PX = 30  # one grid unit of height (Grafana's GRID_CELL_HEIGHT)
DPI = 100
HEADER_PX = 90  # title and variable bar above the grid

BACKGROUND = "#111217"  # Grafana's dark theme
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
MUTED = "#8e8e8e"
ACCENT = {"timeseries": "#73bf69", "stat": "#5794f2", "table": "#ff9830", "row": "#ccccdc"}
KIND = {"timeseries": "time series", "stat": "stat", "table": "table"}
METRIC = re.compile(r"\b((?:switchyard|vllm:)[a-zA-Z0-9_:]*)")


def metrics_of(panel: dict[str, Any]) -> list[str]:
    """The metric names a panel's queries read, in order, without histogram/counter suffixes doubled."""
    found: list[str] = []
    for target in panel.get("targets", []):
        for name in METRIC.findall(target.get("expr", "")):
            name = re.sub(r"_bucket$", "", name)
            if name not in found:
                found.append(name)
    return found


def series_of(panel: dict[str, Any]) -> list[str]:
    """The legend of each query: what one line (or stat, or table row) of the panel stands for."""
    for transformation in panel.get("transformations", []):
        columns = transformation.get("options", {}).get("indexByName")
        if columns:  # a table: its columns
            return [", ".join(sorted(columns, key=columns.__getitem__))]
    legends = [t.get("legendFormat", "") for t in panel.get("targets", [])]
    return [re.sub(r"\{\{\s*(\w+)\s*\}\}", r"<\1>", legend) for legend in legends if legend]


def render(dashboard: dict[str, Any], out: Path) -> None:
    panels = dashboard["panels"]
    grid_rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width_px = COLUMNS * COLUMN_PX
    height_px = grid_rows * ROW_PX + HEADER_PX
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=BACKGROUND)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_px)
    ax.set_ylim(height_px, 0)  # y grows downwards, as in Grafana
    ax.axis("off")

    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax.text(12, 28, dashboard["title"], color=TEXT, fontsize=16, fontweight="bold", va="center")
    variables = list(dashboard.get("templating", {}).get("list", []))
    x = 12.0
    for variable in variables:
        label = f"{variable.get('label') or variable['name']}"
        value = "Prometheus" if variable["type"] == "datasource" else "All"
        text = f"{label}  [{value} ▾]"
        chip = ax.text(x, 62, text, color=TEXT, fontsize=9.5, va="center",
                       bbox={"boxstyle": "round,pad=0.35", "facecolor": PANEL, "edgecolor": BORDER})  # fmt: skip
        x += chip.get_window_extent(renderer).width + 24  # axes units are pixels
    ax.text(width_px - 12, 62, "24-column grid preview · panel titles, types and metrics", color=MUTED,
            fontsize=8.5, va="center", ha="right")  # fmt: skip

    for panel in panels:
        pos = panel["gridPos"]
        left = pos["x"] * COLUMN_PX
        top = HEADER_PX + pos["y"] * ROW_PX
        w = pos["w"] * COLUMN_PX
        h = pos["h"] * ROW_PX
        kind = panel["type"]
        if kind == "row":
            ax.add_patch(Rectangle((left + 4, top + h - 3), w - 8, 1.5, color=BORDER))
            ax.text(left + 8, top + h / 2, f"▾ {panel['title']}", color=TEXT, fontsize=11, fontweight="bold",
                    va="center")  # fmt: skip
            continue
        ax.add_patch(FancyBboxPatch((left + 4, top + 4), w - 8, h - 8, boxstyle="round,pad=0,rounding_size=4",
                                    facecolor=PANEL, edgecolor=BORDER, linewidth=1))  # fmt: skip
        ax.add_patch(Rectangle((left + 4, top + 4), 4, h - 8, color=ACCENT.get(kind, MUTED)))
        chars = max(12, int((w - 30) / 7.2))
        title = textwrap.fill(panel["title"], chars)
        ax.text(left + 16, top + 12, title, color=TEXT, fontsize=10.5, fontweight="bold", va="top",
                linespacing=1.15)  # fmt: skip
        lines = title.count("\n") + 1
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        meta = KIND.get(kind, kind) + (f" · {unit}" if unit and unit != "short" else "")
        ax.text(left + 16, top + 16 + 17 * lines, meta, color=ACCENT.get(kind, MUTED), fontsize=8.5, va="top")
        series = series_of(panel)
        if series and kind != "stat":
            lines += 1
            what = ("columns: " if kind == "table" else "series: ") + " · ".join(series)
            what = textwrap.shorten(what, chars + 6, placeholder=" …")
            ax.text(left + 16, top + 16 + 17 * lines, what, color=TEXT, fontsize=8.5, va="top", alpha=0.8)
        room = int((h - 8 - (26 + 17 * lines)) / 14)  # lines of metric names that fit
        names = metrics_of(panel)
        if room > 0 and names:
            shown = names[:room] if len(names) <= room else [*names[: room - 1], f"+{len(names) - room + 1} more"]
            text = "\n".join(textwrap.shorten(name, chars + 4, placeholder="…") for name in shown)
            ax.text(left + 16, top + 34 + 17 * lines, text, color=MUTED, fontsize=8, va="top", family="monospace",
                    linespacing=1.35)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor=BACKGROUND)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dashboards", nargs="*", type=Path, help="dashboard JSON files (default: the chart's)")
    parser.add_argument("--out", type=Path, default=OUT, help="directory of the PNGs (<dashboard>.png)")
    args = parser.parse_args(argv)
    paths = args.dashboards or sorted(DASHBOARDS.glob("*.json"))
    if not paths:
        print(f"no dashboards in {DASHBOARDS}", file=sys.stderr)
        return 1
    for path in paths:
        out = args.out / f"{path.stem}.png"
        render(json.loads(path.read_text()), out)
        print(f"{path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
