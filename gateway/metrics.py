"""Prometheus collectors: the one place the gateway's metric names are defined.

Each app owns its own CollectorRegistry (no process-global state), so tests can build many apps.
Label values are bounded: `model` is a name some backend served, or one of the fixed placeholders.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.fleet.registry import Registry
from gateway.loop_series import CounterChild, GaugeChild, HistogramChild, LoopCounter, LoopGauge, LoopHistogram

UNKNOWN_MODEL = "__unknown__"  # a name no backend serves (answered 404)
# Label values known in advance: their counters are exported from 0, so rate() and dashboards show 0, not
# "No data", before the first event (Prometheus' instrumentation advice).
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "protocol", "status", "disconnect", "idle_timeout", "error_event")
REJECT_REASONS = ("rate_limit", "saturated", "queue_full", "queue_timeout", "shed")
KV_GAP_OUTCOMES = ("filled", "lost", "restart")
# A departed backend's series are dropped again (a request still running there may count once more) this long.
DEPARTED_S = 3600.0
# What became of a stream whose backend failed mid-stream (switchyard_stream_failovers_total): continued on
# another backend; a continuation tried that failed too; not continuable (n > 1, logprobs, a tool call, ...);
# no other backend or no retry budget left; out of `failover.max_attempts`.
FAILOVER_OUTCOMES = ("continued", "failed", "unsupported", "no_backend", "exhausted")
NO_MODEL = "__none__"  # rejected before a model was known (bad body, too large)

# Up to 10 minutes: long generations are normal for LLM serving.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
PREDICTION_ERROR_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)


@dataclass(frozen=True, slots=True)
class ModelSeries:
    """One model's children of the per-model collectors, looked up once."""

    ttft: HistogramChild
    itl: HistogramChild
    prompt_tokens: CounterChild
    completion_tokens: CounterChild
    retries: CounterChild


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
        queue = GaugeMetricFamily(
            "switchyard_backend_queue_depth", "vLLM's num_requests_waiting at the last scrape.", labels=["backend"]
        )
        kv = GaugeMetricFamily(
            "switchyard_backend_kv_cache_usage",
            "vLLM's kv_cache_usage_perc (0..1) at the last scrape.",
            labels=["backend"],
        )
        per_model = GaugeMetricFamily(
            "switchyard_model_backends",
            "Backends that may take a model's requests now (0: the model is known but nothing serves it).",
            labels=["model"],
        )
        for model, count in self._registry.backends_per_model().items():
            per_model.add_metric([model], float(count))
        for backend in self._registry.backends:
            if backend.engine is not None:
                queue.add_metric([backend.url], backend.engine.waiting)
                kv.add_metric([backend.url], backend.engine.kv_usage)
        yield up
        yield models
        yield per_model
        yield queue
        yield kv


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = LoopCounter(
            "switchyard_requests",
            "Requests answered, by model, route and HTTP status.",
            ["model", "route", "code"],
            self.registry,
        )
        self.duration = LoopHistogram(
            "switchyard_request_duration_seconds",
            "Time from request start to the last byte of the answer.",
            ["model", "route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.inflight = LoopGauge(
            "switchyard_inflight_requests",
            "Requests the gateway has sent to a backend and not yet finished.",
            ["model", "backend"],
            self.registry,
        )
        self.upstream_errors = Counter(
            "switchyard_upstream_errors",
            "Failures talking to a backend, by kind (connect, timeout, protocol, status, disconnect, idle_timeout, "
            "error_event).",
            ["backend", "kind"],
            registry=self.registry,
        )
        self.ttft = LoopHistogram(
            "switchyard_time_to_first_token_seconds",
            "Streams: time from request start to the first chunk with content.",
            ["model"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.itl = LoopHistogram(
            "switchyard_inter_token_latency_seconds",
            "Streams: gap between consecutive chunks after the first content.",
            ["model"],
            registry=self.registry,
            buckets=ITL_BUCKETS,
        )
        self.tokens = LoopCounter(
            "switchyard_tokens",
            "Tokens reported in vLLM's usage, by kind (prompt, completion).",
            ["model", "kind"],
            self.registry,
        )
        self.retries = LoopCounter(
            "switchyard_retries", "Requests sent again to another backend.", ["model"], self.registry
        )
        self.stream_failovers = Counter(
            "switchyard_stream_failovers",
            "Streams whose backend failed after the stream began, by what the gateway did (outcome).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "switchyard_rejected_requests",
            "Requests turned away by admission control or rate limits, by reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.cached_predicted = Counter(
            "switchyard_cached_tokens_predicted",
            "Prompt tokens routing predicted the chosen backend had in its prefix cache.",
            ["model", "backend"],
            registry=self.registry,
        )
        self.cached_reported = Counter(
            "switchyard_cached_tokens_reported",
            "Prompt tokens the engine reported it found cached (usage.prompt_tokens_details.cached_tokens).",
            ["model", "backend"],
            registry=self.registry,
        )
        self.cache_prediction_error = Histogram(
            "switchyard_cache_prediction_error_tokens",
            "Absolute difference between predicted and reported cached prompt tokens, per request.",
            ["model"],
            buckets=PREDICTION_ERROR_BUCKETS,
            registry=self.registry,
        )
        self.kv_events = Counter(
            "switchyard_kv_events",
            "KV cache events applied to the prefix index, per backend.",
            ["backend"],
            registry=self.registry,
        )
        self.kv_event_gaps = Counter(
            "switchyard_kv_event_gaps",
            "Gaps in a backend's KV event sequence, by outcome (filled from the replay socket, lost, restart).",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.kv_event_lag = Gauge(
            "switchyard_kv_event_lag_seconds",
            "Age of the newest KV event batch when it arrived (the engine's clock against the gateway's).",
            ["backend"],
            registry=self.registry,
        )
        self.registry.register(RegistryCollector(registry))

        # Label sets are bounded: keep the children, looked up once per label values.
        self._outcomes: dict[tuple[str, str, int], tuple[CounterChild, HistogramChild]] = {}
        self._models: dict[str, ModelSeries] = {}
        self._backend_series: set[str] = set()  # backends whose counters are exported from 0
        self._departed: dict[str, float] = {}  # backends that left -> when (time.monotonic())
        self._cached_series: dict[str, set[str]] = {}  # backend -> models with cached-token series there
        self._model_series: set[str] = set()

    def export_known_series(self, registry: Registry, now: float | None = None) -> None:
        """Create the per-backend and per-model counters whose label values are known, at 0; drop every series
        of backends that left (so pods that come and go do not grow the label sets for ever)."""
        now = time.monotonic() if now is None else now
        backends = {backend.url for backend in registry.backends}
        for url in backends - self._backend_series:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(url, kind)
        for url in self._backend_series - backends:
            self._departed[url] = now
        for url, since in list(self._departed.items()):
            if url in backends:  # back at the same address
                del self._departed[url]
                continue
            self._drop_backend_series(url)
            if now - since > DEPARTED_S:
                del self._departed[url]
        self._backend_series = backends
        for model in registry.backends_per_model().keys() - self._model_series:
            for reason in REJECT_REASONS:
                self.rejected.labels(model, reason)
            for outcome in FAILOVER_OUTCOMES:
                self.stream_failovers.labels(model, outcome)
            self._model_series.add(model)

    def _drop_backend_series(self, url: str) -> None:
        for kind in UPSTREAM_ERROR_KINDS:
            with contextlib.suppress(KeyError):
                self.upstream_errors.remove(url, kind)
        for outcome in KV_GAP_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.kv_event_gaps.remove(url, outcome)
        for family in (self.kv_events, self.kv_event_lag):
            with contextlib.suppress(KeyError):
                family.remove(url)
        for model in self._cached_series.pop(url, ()):
            for counter in (self.cached_predicted, self.cached_reported):
                with contextlib.suppress(KeyError):
                    counter.remove(model, url)
        for values, child in self.inflight.items():
            if values[1] == url and not child.value:  # one still counting a request stays until it ends
                self.inflight.remove(*values)

    def observe(self, model: str, route: str, code: int, seconds: float) -> None:
        key = (model, route, code)
        children = self._outcomes.get(key)
        if children is None:
            children = (self.requests.labels(model, route, str(code)), self.duration.labels(model, route))
            self._outcomes[key] = children
        children[0].value += 1
        children[1].observe(seconds)

    def model_series(self, model: str) -> ModelSeries:
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(
                ttft=self.ttft.labels(model),
                itl=self.itl.labels(model),
                prompt_tokens=self.tokens.labels(model, "prompt"),
                completion_tokens=self.tokens.labels(model, "completion"),
                retries=self.retries.labels(model),
            )
        return series

    def record_cached_tokens(self, model: str, backend: str, predicted: int | None, reported: int | None) -> None:
        if predicted or reported:
            models = self._cached_series.get(backend)
            if models is None:
                models = self._cached_series[backend] = set()
            models.add(model)
        if predicted:
            self.cached_predicted.labels(model, backend).inc(predicted)
        if reported:
            self.cached_reported.labels(model, backend).inc(reported)
        if predicted is not None and reported is not None:
            self.cache_prediction_error.labels(model).observe(abs(predicted - reported))

    def inflight_gauge(self, model: str, backend: str) -> GaugeChild:
        return self.inflight.labels(model, backend)
