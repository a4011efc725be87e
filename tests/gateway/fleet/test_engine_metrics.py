"""Parsing vLLM's /metrics into an EngineSample, and the scraper against a live simulator."""

from __future__ import annotations

import time

import aiohttp

from gateway.fleet.engine_metrics import EngineScraper, parse_engine_sample
from gateway.fleet.registry import BackendSpec, Registry
from gateway.routing.settings import RoutingSettings
from tests.servers import running_sims, sim

TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.8e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="older",waiting_lora_adapters=""} 1.6e9
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="8192"} 1.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 123.0
"""


def test_sums_queues_averages_kv_and_takes_the_newest_lora_series() -> None:
    sample = parse_engine_sample(TEXT, at=42.0)
    assert sample is not None
    assert (sample.waiting, sample.running, sample.kv_usage, sample.at) == (5.0, 5.0, 0.375, 42.0)
    assert sample.running_adapters == frozenset({"a", "b"})
    assert sample.max_lora == 2  # adapters a batch may run at once


def test_absent_gauges_give_no_sample_and_bad_lines_are_skipped() -> None:
    assert parse_engine_sample(b"# nothing here\nprocess_cpu_seconds_total 1.0\n", 0.0) is None
    sample = parse_engine_sample(b'vllm:num_requests_waiting{engine="0"} oops\nvllm:num_requests_running{} 2\n', 0.0)
    assert sample is not None
    assert (sample.waiting, sample.running, sample.running_adapters) == (0.0, 2.0, frozenset())
    assert sample.max_lora is None  # no lora_requests_info: unknown, not zero


def test_values_that_are_not_finite_are_no_load_figure() -> None:
    """NaN and ±Inf are valid in the text format: they must not reach the routing scores (a NaN score left
    no backend to pick) nor the admin endpoint's JSON."""
    text = b'vllm:num_requests_waiting{engine="0"} NaN\nvllm:num_requests_running{engine="0"} +Inf\n'
    text += b'vllm:kv_cache_usage_perc{engine="0"} NaN\nvllm:num_requests_waiting{engine="1"} 3\n'
    sample = parse_engine_sample(text, 0.0)
    assert sample is not None
    assert (sample.waiting, sample.running, sample.kv_usage) == (3.0, 0.0, 0.0)


def test_figures_no_engine_reports_are_no_load_figure() -> None:
    """A negative queue drew every request to that backend; KV use over 100% is no fraction of a cache."""
    text = b'vllm:num_requests_waiting{engine="0"} -1000\nvllm:num_requests_running{engine="0"} -2\n'
    text += b'vllm:kv_cache_usage_perc{engine="0"} 1e9\nvllm:num_requests_waiting{engine="1"} 3\n'
    sample = parse_engine_sample(text, 0.0)
    assert sample is not None
    assert (sample.waiting, sample.running, sample.kv_usage) == (3.0, 0.0, 1.0)


def test_label_values_with_braces_quotes_and_a_trailing_timestamp() -> None:
    text = (
        b'vllm:num_requests_running{model_name="a}b",engine="0"} 3.0\n'  # the first line, a brace in a value
        b'vllm:num_requests_waiting{model_name="x\\"y"} 2 1700000000000\n'  # an escaped quote; a timestamp
        b'vllm:num_requests_waiting_by_reason{reason="capacity"} 40\n'  # another series with the same prefix
        b'vllm:lora_requests_info{max_lora="4",running_lora_adapters="p,q",waiting_lora_adapters=""} 5\n'
    )
    sample = parse_engine_sample(text, 0.0)
    assert sample is not None
    assert (sample.running, sample.waiting, sample.max_lora) == (3.0, 2.0, 4)
    assert sample.running_adapters == frozenset({"p", "q"})


async def test_scraper_fills_fresh_samples_and_skips_dead_backends() -> None:
    with running_sims(sim("m", "--lora", "a", count=2)) as (fleet,):
        registry = Registry()
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        registry.reconcile([BackendSpec(url) for url in [*fleet.urls(), dead]])
        for backend in registry.backends:
            registry.set_models(backend, [{"id": "m"}])
        settings = RoutingSettings(scrape_interval=0.05, scrape_timeout=0.3)
        async with aiohttp.ClientSession() as session:
            scraper = EngineScraper(registry, session, settings)
            for backend in registry.backends:
                await scraper.scrape_once(backend)
        live = [b for b in registry.backends if b.url != dead]
        assert all(b.engine is not None and time.monotonic() - b.engine.at < 5 for b in live)
        assert next(b for b in registry.backends if b.url == dead).engine is None
