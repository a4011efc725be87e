"""vLLM's Prometheus metrics for one simulated server, on a registry of its own.

Everything is read at scrape time by one custom collector: gauges and counters come from the
engine's state, latency histograms from `BucketCounts` the engine's observer fills in. Observing
is a bisect and two additions, cheap enough for thousands of tokens per step. Series carry
`model_name` (the served name) and `engine="0"`, as vLLM's do.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.sim.driver import EngineDriver
from worker.sim.engine import Engine, SimRequest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
LABELS = ("model_name", "engine")


class BucketCounts:
    """A histogram's state: per-bucket counts (not cumulative), sum and count."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, labels: list[str]) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            cumulative.append((bound, running))
        fam = HistogramMetricFamily(self.name, self.doc, labels=LABELS)
        fam.add_metric(labels, cumulative, self.sum)
        return fam


class SimMetrics(Collector):
    """The per-server registry and collector; also the engine's observer for the latency histograms."""

    def __init__(self, engine: Engine, model_name: str, driver: EngineDriver | None = None) -> None:
        self.engine = engine
        self.driver = driver
        self.labels = [model_name, "0"]
        self.ttft = BucketCounts("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                 TTFT_BUCKETS)  # fmt: skip
        self.itl = BucketCounts("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                ITL_BUCKETS)  # fmt: skip
        self.e2e = BucketCounts("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                REQUEST_BUCKETS)  # fmt: skip
        self.queue = BucketCounts("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase.",
                                  REQUEST_BUCKETS)  # fmt: skip
        self.prefill = BucketCounts("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase.",
                                    REQUEST_BUCKETS)  # fmt: skip
        self.decode = BucketCounts("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase.",
                                   REQUEST_BUCKETS)  # fmt: skip
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        engine.observer = self

    # ----- EngineObserver -----
    def on_scheduled(self, req: SimRequest) -> None:
        if req.scheduled_at is not None:
            self.queue.observe(max(req.scheduled_at - req.arrival, 0.0))

    def on_token(self, req: SimRequest, now: float) -> None:
        if req.last_token_at is None:
            self.ttft.observe(max(now - req.arrival, 0.0))
            if req.scheduled_at is not None:
                self.prefill.observe(max(now - req.scheduled_at, 0.0))
        else:
            self.itl.observe(now - req.last_token_at)

    def on_finished(self, req: SimRequest) -> None:
        if req.finished_at is None:
            return
        self.e2e.observe(max(req.finished_at - req.arrival, 0.0))
        if req.first_token_at is not None:
            self.decode.observe(req.finished_at - req.first_token_at)

    # ----- Collector -----
    def collect(self) -> Iterable[Metric]:
        eng, labels, cfg, s = self.engine, self.labels, self.engine.cfg, self.engine.stats
        yield self._gauge("vllm:num_requests_running", "Requests in the model execution batch.", len(eng.running))
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", len(eng.waiting))
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage())
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             s.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", s.prefix_hits),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(labels, value)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.", labels=(*LABELS, "finished_reason")
        )
        for reason in ("stop", "length", "abort", "error", "repetition"):  # vLLM 0.32's finished reasons
            success.add_metric([*labels, reason], s.finished.get(reason, 0))
        yield success
        for hist in (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode):
            yield hist.family(labels)
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )
        running, waiting = ",".join(eng.running_adapters()), ",".join(eng.waiting_adapters())
        lora.add_metric([str(cfg.max_loras), running, waiting], time.time())
        yield lora
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"),
        )
        info.add_metric([str(cfg.block_size), str(cfg.num_gpu_blocks), "True", "0"], 1.0)
        yield info
        if self.driver is not None:
            yield from self._driver_metrics(self.driver)

    def _driver_metrics(self, driver: EngineDriver) -> Iterable[Metric]:
        """Simulator-only health: how far the event loop lags the engine model's timeline."""
        for name, doc, value in (
            ("sim:engine_steps", "Engine steps run (simulator only).", driver.steps),
            ("sim:step_lag_seconds", "Summed lateness of step ends against the model's timeline (simulator only).",
             driver.lag_sum_s),
            ("sim:timeline_resyncs", "Times the loop fell so far behind that the timeline restarted (simulator only).",
             driver.resyncs),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(self.labels, value)
            yield counter
        yield self._gauge("sim:step_lag_max_seconds", "Largest lateness of a step end (simulator only).",
                          driver.lag_max_s)  # fmt: skip

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, doc, labels=LABELS)
        gauge.add_metric(self.labels, value)
        return gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)
