"""Checks shared by every suite that proves the dashboards and alerts against a live Prometheus
(tests/observability with simulators here; the e2e suite may run the same against real vLLM)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.observability import grafana
from tests.observability.prometheus import Prometheus, PromQLError, Sample


def finite_values(samples: Sequence[Sample]) -> list[float]:
    return [v for v in (float(sample["value"][1]) for sample in samples) if math.isfinite(v)]


def has_data(samples: Sequence[Sample]) -> bool:
    """What "not No Data" means here: at least one series, and at least one of them a real number
    (a histogram_quantile over nothing is NaN: Grafana draws nothing for it)."""
    return bool(finite_values(samples))


@dataclass(frozen=True)
class PanelResult:
    query: grafana.PanelQuery
    variables: Mapping[str, str]
    expr: str  # filled in
    samples: list[Sample]
    error: str | None = None

    def describe(self) -> str:
        what = self.error or f"{len(self.samples)} series, finite values {finite_values(self.samples)[:3]}"
        return f"{self.query.name} with {dict(self.variables)}: {what}\n    {self.expr}"


def evaluate_panels(
    prom: Prometheus, variable_sets: Sequence[Mapping[str, str]], dashboards: Sequence[Path] | None = None
) -> list[PanelResult]:
    """Every target of every panel of every dashboard, once per set of template variable values."""
    results: list[PanelResult] = []
    for path in dashboards or grafana.dashboard_files():
        for query in grafana.queries(path):
            for variables in variable_sets:
                expr = grafana.fill(query.expr, variables)
                try:
                    results.append(PanelResult(query, variables, expr, prom.query(expr)))
                except PromQLError as exc:
                    results.append(PanelResult(query, variables, expr, [], str(exc)))
    return results


def panels_without_data(
    prom: Prometheus,
    variable_sets: Sequence[Mapping[str, str]],
    timeout: float,
    dashboards: Sequence[Path] | None = None,
) -> list[PanelResult]:
    """Re-evaluate until every panel query has data (or `timeout`); the ones still empty or failing.
    A query Prometheus rejects is never retried into success: errors are returned at once."""
    deadline = time.monotonic() + timeout
    while True:
        results = evaluate_panels(prom, variable_sets, dashboards)
        errors = [r for r in results if r.error]
        missing = [r for r in results if not r.error and not has_data(r.samples)]
        if errors or not missing or time.monotonic() > deadline:
            return errors + missing
        time.sleep(1.0)


@dataclass(frozen=True)
class AlertRule:
    group: str
    name: str
    expr: str
    spec: Mapping[str, Any]


def alert_rules(paths: Sequence[Path] | None = None) -> list[AlertRule]:
    rules: list[AlertRule] = []
    for path in paths or sorted(grafana.ALERTS.glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rules.append(AlertRule(group["name"], rule["alert"], rule["expr"], rule))
    return rules
