"""Prometheus collectors: the one place the gateway's metric names are defined.

Each app owns its own CollectorRegistry (no process-global state), so tests can build many apps.
Label values are bounded: `model` is a name some backend served, or one of the fixed placeholders.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.registry import Registry

UNKNOWN_MODEL = "__unknown__"  # a name no backend serves (answered 404)
NO_MODEL = "__none__"  # rejected before a model was known (bad body, too large)

# Up to 10 minutes: long generations are normal for LLM serving.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class RegistryCollector(Collector):
    """Backend state read from the registry at scrape time, so nothing has to be kept in step."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "switchyard_backend_up", "1 when the backend answers and takes requests.", labels=["backend"]
        )
        models = GaugeMetricFamily(
            "switchyard_backend_models", "Models (base and adapters) the backend serves.", labels=["backend"]
        )
        for backend in self._registry.backends:
            up.add_metric([backend.url], 1.0 if backend.routable else 0.0)
            models.add_metric([backend.url], float(len(backend.models)) if backend.healthy else 0.0)
        yield up
        yield models


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "switchyard_requests",
            "Requests answered, by model, route and HTTP status.",
            ["model", "route", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "switchyard_request_duration_seconds",
            "Time from request start to the last byte of the answer.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "switchyard_inflight_requests",
            "Requests the gateway has sent to a backend and not yet finished.",
            ["model", "backend"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "switchyard_upstream_errors",
            "Failures talking to a backend, by kind (connect, timeout, disconnect, status).",
            ["backend", "kind"],
            registry=self.registry,
        )
        self.registry.register(RegistryCollector(registry))

    def observe(self, model: str, route: str, code: int, seconds: float) -> None:
        self.requests.labels(model, route, str(code)).inc()
        self.duration.labels(model, route).observe(seconds)
