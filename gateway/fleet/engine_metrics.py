"""Scrapes each backend's /metrics for the few vLLM series routing needs (HOW BUSY it is, how fast it works).

Only the needed lines are parsed. Scrapes run on their own task, at most `scrape_concurrency` at a
time, with a timeout; a backend whose scrape is still running is skipped in the next round, so one
slow backend never delays the samples of the others. The request path only reads `backend.engine`;
a failed scrape leaves the old sample to age, and policies treat a sample older than `stale_after`
as unknown load (not as idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time

import aiohttp

from gateway.fleet.registry import Backend, EngineSample, Registry
from gateway.routing.settings import RoutingSettings

# The series routing reads, matched in one pass of the regex engine over the whole exposition: a real vLLM's
# /metrics runs to tens of kilobytes, mostly histograms, and splitting it into lines in Python cost half a
# millisecond per scrape for 16 KB (a twelfth of that this way), at ten scrapes a second per backend.
_SERIES = re.compile(
    rb"\nvllm:(num_requests_waiting|num_requests_running|kv_cache_usage_perc|lora_requests_info|prompt_tokens_total"
    rb"|prefix_cache_hits_total|request_prefill_time_seconds_sum|request_success_total|cache_config_info)"
    rb'\{((?:[^"}\n]|"(?:[^"\\\n]|\\.)*")*)\} ([^ \n]+)'  # a quoted label value may hold a brace
)
RUNNING_ADAPTERS = b'running_lora_adapters="'
MAX_LORA = b'max_lora="'
BLOCK_SIZE = b'block_size="'
NUM_GPU_BLOCKS = b'num_gpu_blocks="'


def _label(line: bytes, marker: bytes) -> bytes | None:
    start = line.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = line.find(b'"', start)
    return line[start:end] if end >= 0 else None


def parse_engine_sample(text: bytes, at: float) -> EngineSample | None:
    """The sums of vLLM's queue, batch and KV gauges over engines, or None if they are absent.

    KV usage is averaged over engines (data-parallel ranks each report their own 0..1). Running
    adapters come from the newest `lora_requests_info` series: vLLM keeps one series per label set
    with the time it was last set as its value, so older series are history, not current state.
    """
    waiting = running = kv = 0.0
    prompt = hits = prefill = success = 0.0
    block_size = blocks = 0
    kv_engines = 0
    seen = False
    newest = -1.0
    adapters = b""
    max_lora = 0
    for match in _SERIES.finditer(b"\n" + text):
        name, labels, number = match.groups()
        with contextlib.suppress(ValueError):
            value = float(number)
            # NaN or ±Inf, which the text format allows, or a negative count or usage: no load figure (a
            # negative queue would draw every request to that backend)
            if not math.isfinite(value) or value < 0:
                continue
            if name == b"num_requests_waiting":
                waiting += value
                seen = True
            elif name == b"num_requests_running":
                running += value
                seen = True
            elif name == b"kv_cache_usage_perc":
                kv += value
                kv_engines += 1
                seen = True
            elif name == b"lora_requests_info":
                if value > newest:
                    newest = value
                    adapters = _label(labels, RUNNING_ADAPTERS) or b""
                    max_lora = int(_label(labels, MAX_LORA) or 0)
            elif name == b"prompt_tokens_total":
                prompt += value
            elif name == b"prefix_cache_hits_total":
                hits += value
            elif name == b"request_prefill_time_seconds_sum":
                prefill += value
            elif name == b"request_success_total":
                success += value
            else:  # cache_config_info
                block_size = int(_label(labels, BLOCK_SIZE) or 0)
                blocks += int(_label(labels, NUM_GPU_BLOCKS) or 0)  # per engine: data-parallel ranks add up
    if not seen:
        return None
    running_adapters = frozenset(name for name in adapters.decode("utf-8", "replace").split(",") if name)
    return EngineSample(
        waiting=waiting,
        running=running,
        kv_usage=min(kv / kv_engines, 1.0) if kv_engines else 0.0,  # a fraction: over 1 is no engine's figure
        running_adapters=running_adapters,
        at=at,
        max_lora=max_lora or None,
        prompt_tokens=prompt,
        prefix_hits=hits,
        prefill_seconds=prefill,
        finished=success,
        block_size=block_size or None,
        num_blocks=blocks or None,
    )


class EngineScraper:
    def __init__(self, registry: Registry, session: aiohttp.ClientSession, settings: RoutingSettings) -> None:
        self._registry = registry
        self._session = session
        self._interval = settings.scrape_interval
        self._timeout = aiohttp.ClientTimeout(total=settings.scrape_timeout)
        self._limit = asyncio.Semaphore(settings.scrape_concurrency)
        self._busy: set[str] = set()  # urls with a scrape in flight

    async def run(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                for backend in self._registry.backends:
                    if backend.healthy and backend.url not in self._busy:
                        self._busy.add(backend.url)
                        task = asyncio.create_task(self._scrape(backend))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                await asyncio.sleep(self._interval)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _scrape(self, backend: Backend) -> None:
        try:
            async with self._limit:
                await self.scrape_once(backend)
        finally:
            self._busy.discard(backend.url)

    async def scrape_once(self, backend: Backend) -> None:
        try:
            async with self._session.get(f"{backend.url}/metrics", timeout=self._timeout) as response:
                if response.status != 200:
                    return
                text = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return  # the sample ages and counts as unknown
        sample = parse_engine_sample(text, time.monotonic())
        if sample is not None:
            self._registry.record_engine(backend, sample)
