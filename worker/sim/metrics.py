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

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from worker.sim.driver import EngineDriver
from worker.sim.engine import Engine, SimRequest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
LABELS = ("model_name", "engine")
GAUGES = (
    ("vllm:num_requests_running", "Requests in the model execution batch."),
    ("vllm:num_requests_waiting", "Requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
COUNTERS = (
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
)
SUCCESS = ("vllm:request_success", "Count of successfully processed requests.")
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM 0.32's
LORA_INFO = ("vllm:lora_requests_info", "Running stats on lora requests.")
CACHE_INFO = ("vllm:cache_config_info", "Information of the LLMEngine CacheConfig")
DRIVER_COUNTERS = (
    ("sim:engine_steps", "Engine steps run (simulator only)."),
    ("sim:step_lag_seconds", "Summed lateness of step ends against the model's timeline (simulator only)."),
    ("sim:timeline_resyncs", "Times the loop fell so far behind that the timeline restarted (simulator only)."),
)
DRIVER_GAUGE = ("sim:step_lag_max_seconds", "Largest lateness of a step end (simulator only).")


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
        self._histograms = (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode)
        self._text = _ExpositionText(self)
        self.registry = CollectorRegistry(auto_describe=False)  # prometheus_client's view of the same series
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
    def _values(self) -> tuple[list[float], list[float], list[float], list[str], list[float]]:
        """This scrape's numbers: gauges, counters, finished requests by reason, the LoRA labels, driver counters
        and lag (in the order of GAUGES, COUNTERS, FINISHED_REASONS, LORA_INFO's labels, DRIVER_*)."""
        eng, cfg, s = self.engine, self.engine.cfg, self.engine.stats
        gauges: list[float] = [len(eng.running), len(eng.waiting), eng.kv_usage()]
        counters: list[float] = [s.prefix_queries, s.prefix_hits, s.prompt_tokens, s.generation_tokens, 0]
        finished: list[float] = [s.finished.get(reason, 0) for reason in FINISHED_REASONS]
        lora = [str(cfg.max_loras), ",".join(eng.running_adapters()), ",".join(eng.waiting_adapters())]
        driver = self.driver
        lags = [] if driver is None else [driver.steps, driver.lag_sum_s, driver.resyncs, driver.lag_max_s]
        return gauges, counters, finished, lora, lags

    def collect(self) -> Iterable[Metric]:
        labels, cfg = self.labels, self.engine.cfg
        gauges, counters, finished, lora_labels, lags = self._values()
        for (name, doc), value in zip(GAUGES, gauges, strict=True):
            yield self._gauge(name, doc, value)
        for (name, doc), value in zip(COUNTERS, counters, strict=True):
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(labels, value)
            yield counter
        success = CounterMetricFamily(*SUCCESS, labels=(*LABELS, "finished_reason"))
        for reason, count in zip(FINISHED_REASONS, finished, strict=True):
            success.add_metric([*labels, reason], count)
        yield success
        for hist in self._histograms:
            yield hist.family(labels)
        lora = GaugeMetricFamily(*LORA_INFO, labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"))
        lora.add_metric(lora_labels, time.time())
        yield lora
        info_labels = ("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine")
        info = GaugeMetricFamily(*CACHE_INFO, labels=info_labels)
        info.add_metric([str(cfg.block_size), str(cfg.num_gpu_blocks), "True", "0"], 1.0)
        yield info
        if lags:
            for (name, doc), value in zip(DRIVER_COUNTERS, lags, strict=False):
                counter = CounterMetricFamily(name, doc, labels=LABELS)
                counter.add_metric(self.labels, value)
                yield counter
            yield self._gauge(*DRIVER_GAUGE, lags[3])

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, doc, labels=LABELS)
        gauge.add_metric(self.labels, value)
        return gauge

    def render(self) -> bytes:
        """What prometheus_client's generate_latest(self.registry) writes, byte for byte, from text laid out once:
        its per-sample name checks and label escaping took 3 ms a scrape, and eight simulated servers in one
        process, each scraped ten times a second (as the gateway does), spent a quarter of a core on it, which
        delayed their engines' steps."""
        gauges, counters, finished, lora, lags = self._values()
        text = self._text
        out = [text.gauges % tuple(map(_number, gauges)), text.counters % tuple(map(_number, counters))]
        out.append(text.success % tuple(map(_number, finished)))
        for hist, lines in zip(self._histograms, text.histograms, strict=True):
            out.append(lines.head)
            cumulative = 0
            for prefix, count in zip(lines.buckets, hist.counts, strict=True):
                cumulative += count
                out.append(prefix + _number(cumulative) + "\n")
            out.append(lines.count + _number(cumulative) + "\n" + lines.sum + _number(hist.sum) + "\n")
        lora_labels = ",".join(
            f'{key}="{_label_value(value)}"'
            for key, value in zip(("max_lora", "running_lora_adapters", "waiting_lora_adapters"), lora, strict=True)
        )
        out.append(text.lora % (lora_labels, _number(time.time())))
        out.append(text.cache)
        if lags:
            out.append(text.driver % tuple(map(_number, lags)))
        return "".join(out).encode()


class _HistogramText:
    __slots__ = ("buckets", "count", "head", "sum")

    def __init__(self, hist: BucketCounts, server: str) -> None:
        self.head = f"# HELP {hist.name} {hist.doc}\n# TYPE {hist.name} histogram\n"
        bounds = [*map(_number, hist.bounds), "+Inf"]
        self.buckets = [f'{hist.name}_bucket{{engine="0",le="{bound}",{server}}} ' for bound in bounds]
        self.count = f'{hist.name}_count{{engine="0",{server}}} '
        self.sum = f'{hist.name}_sum{{engine="0",{server}}} '


class _ExpositionText:
    """The parts of a simulated server's exposition that never change, with %s where the numbers go."""

    def __init__(self, metrics: SimMetrics) -> None:
        model = _label_value(metrics.labels[0])
        server = f'model_name="{model}"'
        series = f'{{engine="0",{server}}} %s\n'
        self.gauges = "".join(f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{series}" for name, doc in GAUGES)
        self.counters = "".join(
            f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n{name}_total{series}" for name, doc in COUNTERS
        )
        name, doc = SUCCESS
        self.success = f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n" + "".join(
            f'{name}_total{{engine="0",finished_reason="{reason}",{server}}} %s\n' for reason in FINISHED_REASONS
        )
        self.histograms = [_HistogramText(hist, server) for hist in metrics._histograms]
        name, doc = LORA_INFO
        self.lora = f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{{%s}} %s\n"
        cfg = metrics.engine.cfg
        name, doc = CACHE_INFO
        self.cache = (
            f'# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{{block_size="{cfg.block_size}",'
            f'enable_prefix_caching="True",engine="0",num_gpu_blocks="{cfg.num_gpu_blocks}"}} 1.0\n'
        )
        self.driver = "".join(
            f"# HELP {name}_total {doc}\n# TYPE {name}_total counter\n{name}_total{series}"
            for name, doc in DRIVER_COUNTERS
        ) + "# HELP {0} {1}\n# TYPE {0} gauge\n{0}{2}".format(*DRIVER_GAUGE, series)


def _number(value: float) -> str:
    return floatToGoString(value)  # type: ignore[no-untyped-call, no-any-return]


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value
