"""Grafana dashboard JSON as the tests need it: panels, their PromQL with template variables filled in,
their grid rectangles. Reusable by the e2e suite (same dashboards against real vLLM)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "helm" / "switchyard" / "dashboards"
ALERTS = REPO / "helm" / "switchyard" / "alerts"
GRID_COLUMNS = 24

Dashboard = dict[str, Any]
Panel = dict[str, Any]


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file stem
    panel: str  # panel title
    ref_id: str
    expr: str  # as written in the dashboard, with $variables

    @property
    def name(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> Dashboard:
    dashboard: Dashboard = json.loads(path.read_text())
    return dashboard


def panels(dashboard: Dashboard) -> Iterator[Panel]:
    """Every panel, rows included, and the panels folded inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(path: Path) -> list[PanelQuery]:
    dashboard = load(path)
    return [
        PanelQuery(path.stem, panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_queries(dashboard: Dashboard) -> dict[str, str]:
    """name -> label_values(...) definition of each query variable."""
    found: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return found


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(metric{sel}, label)` -> (match selector or None, label)."""
    found = LABEL_VALUES.match(query.strip())
    if found is None:
        raise ValueError(f"not a label_values() query: {query}")
    return found["match"], found["label"]


def fill(expr: str, variables: Mapping[str, str]) -> str:
    """Substitute $name, ${name} and ${name:format} the way Grafana does for single values; fails on a
    variable left unknown, so a dashboard cannot use one the test does not provide."""

    def substitute(found: re.Match[str]) -> str:
        name = found["braced"] or found["plain"]
        if name not in variables:
            raise KeyError(f"unknown template variable ${name} in: {expr}")
        return variables[name]

    return re.sub(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)", substitute, expr)


@dataclass(frozen=True)
class Rect:
    title: str
    x: int
    y: int
    w: int
    h: int

    def overlaps(self, other: Rect) -> bool:
        return (
            self.x < other.x + other.w
            and other.x < self.x + self.w
            and self.y < other.y + other.h
            and (other.y < self.y + self.h)
        )


def rects(dashboard: Dashboard) -> list[Rect]:
    """Grid rectangles of the top-level panels (what Grafana lays out when every row is expanded)."""
    return [
        Rect(panel.get("title", ""), **{k: int(panel["gridPos"][k]) for k in ("x", "y", "w", "h")})
        for panel in dashboard.get("panels", [])
    ]
