"""Static checks of the shipped dashboards and alert rules (no Prometheus needed): shape, variables,
layout, and that PromQL uses rate()/histogram_quantile() the way Grafana panels should."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.observability import checks, grafana
from tests.observability.prometheus import promtool_binary

DASHBOARDS = grafana.dashboard_files()
ALERT_FILES = sorted(grafana.ALERTS.glob("*.yaml"))
REPO = grafana.REPO
ids = [path.stem for path in DASHBOARDS]

# The panels issue 6 asks for, by dashboard: words each must find in some panel title.
REQUIRED_PANELS = {
    "gateway-overview": [
        "requests/s by model and code",
        "error ratio",
        "request latency p50 / p95 / p99",
        "time to first token p50 / p95 / p99",
        "tokens/s",
        "in-flight",
        "backends up per model",
        "retries",
        "rejections",
    ],
    "engines": [
        "running and waiting",
        "kv-cache usage",
        "prefix-cache hit rate",
        "time to first token p50 / p95 / p99",
        "inter-token latency p50 / p95 / p99",
        "end-to-end latency p50 / p95 / p99",
        "prompt tokens/s",
        "generation tokens/s",
        "lora adapters running",
    ],
}
METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
MODEL_LABEL = {"gateway-overview": "model", "engines": "model_name"}  # switchyard_* vs vllm:*


def test_both_dashboards_ship() -> None:
    assert set(ids) == set(REQUIRED_PANELS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_dashboard_shape_and_variables(path: Path) -> None:
    dashboard = grafana.load(path)
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"].startswith("switchyard-")
    assert len(dashboard["uid"]) <= 40
    assert dashboard["title"].startswith("Switchyard / ")
    assert dashboard["id"] is None  # provisioned dashboards must not carry a database id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "model"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        _, label = grafana.parse_label_values(variable["query"]["query"])
        assert variable["definition"] == variable["query"]["query"]
        assert label == ("namespace" if name == "namespace" else MODEL_LABEL[path.stem])
        assert variable["includeAll"]
        assert variable["multi"]
        assert variable["allValue"] == ".*"
    model_label = MODEL_LABEL[path.stem]
    assert '$namespace"' in variables["model"]["query"]["query"]  # model list follows the namespace choice
    for panel in grafana.panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets")
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            expr = target["expr"]
            assert 'namespace=~"$namespace"' in expr, (panel["title"], expr)
            if f"{model_label}=~" in expr or panel["title"].startswith(("Backend", "Engine", "Upstream")):
                continue
            raise AssertionError(f"{panel['title']}: not filtered by ${model_label}: {expr}")


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_the_panels_issue_6_lists(path: Path) -> None:
    titles = [panel["title"].lower() for panel in grafana.panels(grafana.load(path))]
    for words in REQUIRED_PANELS[path.stem]:
        assert any(words in title for title in titles), (words, titles)


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_panels_do_not_overlap_and_fit_the_grid(path: Path) -> None:
    dashboard = grafana.load(path)
    rects = grafana.rects(dashboard)
    assert len({panel["id"] for panel in grafana.panels(dashboard)}) == len(list(grafana.panels(dashboard)))
    for rect in rects:
        assert min(rect.w, rect.h) > 0, rect
        assert min(rect.x, rect.y) >= 0, rect
        assert rect.x + rect.w <= grafana.GRID_COLUMNS, rect
    overlaps = [(a.title, b.title) for i, a in enumerate(rects) for b in rects[i + 1 :] if a.overlaps(b)]
    assert overlaps == []


def test_the_overlap_check_sees_an_overlap() -> None:
    a = grafana.Rect("a", x=0, y=0, w=12, h=8)
    assert a.overlaps(grafana.Rect("b", x=11, y=7, w=4, h=4))
    assert not a.overlaps(grafana.Rect("c", x=12, y=0, w=12, h=8))  # side by side
    assert not a.overlaps(grafana.Rect("d", x=0, y=8, w=24, h=1))  # right below


@pytest.mark.parametrize("path", DASHBOARDS, ids=ids)
def test_counters_and_histograms_only_through_rate(path: Path) -> None:
    for query in grafana.queries(path):
        expr = query.expr
        for found in re.finditer(rf"(?<![\w:])({METRIC}_(?:total|bucket|count|sum))\{{", expr):
            assert expr[: found.start()].endswith("rate("), (query.name, found[1])
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", (query.name, window)
        for found in re.finditer(r"histogram_quantile\(", expr):
            rest = expr[found.end() :]
            assert re.match(
                rf"0\.\d+, sum by \(le(?:, \w+)*\) \(rate\({METRIC}_bucket\{{[^}}]*\}}\[\$__rate_interval\]\)\)\)",
                rest,
            ), (query.name, expr)


def test_fill_substitutes_grafana_variables() -> None:
    expr = 'rate(x{namespace=~"$namespace", model=~"${model}"}[$__rate_interval])'
    filled = grafana.fill(expr, {"namespace": "ns", "model": "m", "__rate_interval": "1m"})
    assert filled == 'rate(x{namespace=~"ns", model=~"m"}[1m])'
    with pytest.raises(KeyError, match="pod"):
        grafana.fill("up{pod=~'$pod'}", {})


def test_alert_rules_shape() -> None:
    rules = checks.alert_rules(ALERT_FILES)
    assert {rule.name for rule in rules} == {
        "SwitchyardGatewayDown",
        "SwitchyardNoBackendForModel",
        "SwitchyardHighErrorRatio",
        "SwitchyardHighTimeToFirstToken",
        "SwitchyardEngineQueueGrowing",
    }
    for rule in rules:
        spec = rule.spec
        assert re.fullmatch(r"\d+m", spec["for"]), rule.name
        assert spec["labels"]["severity"] in ("warning", "critical")
        assert spec["annotations"]["summary"]
        assert spec["annotations"]["description"]
    for path in ALERT_FILES:  # what the chart's PrometheusRule template reads: a `groups:` list
        assert set(yaml.safe_load(path.read_text())) == {"groups"}


def test_promtool_checks_the_rules() -> None:
    promtool = promtool_binary()
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; scripts/setup.sh installs it)")
    for path in ALERT_FILES:
        done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_alerts() -> None:
    """alerts-test.yaml: each alert fires only after its `for:`, on the faulty series only, with its
    annotations rendered; healthy neighbours (a steady long queue, 4xx, a fast model) stay quiet."""
    promtool = promtool_binary()
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; scripts/setup.sh installs it)")
    tests = Path(__file__).with_name("alerts-test.yaml")
    done = subprocess.run(
        [promtool, "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    tested = {
        case["alertname"] for group in yaml.safe_load(tests.read_text())["tests"] for case in group["alert_rule_test"]
    }
    assert tested == {rule.name for rule in checks.alert_rules(ALERT_FILES)}


def test_every_dashboard_has_a_current_preview() -> None:
    """docs/dashboards/<name>.png exists, and its size matches the dashboard's grid height (a stale preview
    of a dashboard that grew or shrank fails here; the scale is the render script's: 64 px per column,
    30 px per grid row, 90 px of header)."""
    previews = REPO / "docs" / "dashboards"
    for path in DASHBOARDS:
        preview = previews / f"{path.stem}.png"
        assert preview.is_file(), f"run scripts/render-dashboard-previews.py: {preview} is missing"
        head = preview.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        rows = max(rect.y + rect.h for rect in grafana.rects(grafana.load(path)))
        assert (width, height) == (24 * 64, rows * 30 + 90), f"{preview} is stale: re-run the render script"
