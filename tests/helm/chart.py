"""Render the chart with the real Helm engine (helm-python-sdk binds Helm's Go SDK; no binary, no cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "switchyard"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "sy"
NAMESPACE = "serving"
# Kinds from CRDs (Prometheus Operator, KEDA, Gateway API): kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject", "HTTPRoute"}

Obj = dict[str, Any]


@cache
def _chart(path: Path) -> Any:
    return helm.Chart.load(str(path))


def load_values(path: Path) -> Obj:
    values = yaml.safe_load(path.read_text())
    return values or {}


def render_files(values: Obj | None = None, *, chart: Path = CHART, release: str = RELEASE) -> dict[str, str]:
    """{template path: rendered text}, as `helm template` would produce (hooks included)."""
    loaded = _chart(chart) if chart == CHART else helm.Chart.load(str(chart))  # a test's copy may change
    files: dict[str, str] = loaded.render(values or {}, name=release, namespace=NAMESPACE)
    return files


def render(values: Obj | None = None, **kwargs: Any) -> list[Obj]:
    """Every rendered object (NOTES.txt left out), in template order."""
    objects: list[Obj] = []
    for path, text in sorted(render_files(values, **kwargs).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: Obj | None = None) -> str:
    return next(text for path, text in render_files(values).items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(object name, pod spec) for every Deployment and bare Pod."""
    for obj in objects:
        if obj["kind"] == "Deployment":
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["spec"]


def workers(objects: list[Obj]) -> list[Obj]:
    return [
        obj
        for obj in of_kind(objects, "Deployment")
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]
