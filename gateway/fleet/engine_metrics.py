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
import time

import aiohttp

from gateway.fleet.registry import Backend, EngineSample, Registry
from gateway.routing.settings import RoutingSettings

WAITING = b"vllm:num_requests_waiting{"
RUNNING = b"vllm:num_requests_running{"
KV_USAGE = b"vllm:kv_cache_usage_perc{"
LORA_INFO = b"vllm:lora_requests_info{"
RUNNING_ADAPTERS = b'running_lora_adapters="'
MAX_LORA = b'max_lora="'
# Counters the cost model learns from, and the cache's geometry.
PROMPT_TOKENS = b"vllm:prompt_tokens_total{"
PREFIX_HITS = b"vllm:prefix_cache_hits_total{"
PREFILL_TIME = b"vllm:request_prefill_time_seconds_sum{"
SUCCESS = b"vllm:request_success_total{"
CACHE_INFO = b"vllm:cache_config_info{"
BLOCK_SIZE = b'block_size="'
NUM_GPU_BLOCKS = b'num_gpu_blocks="'


def _value(line: bytes) -> float:
    return float(line.rsplit(b" ", 1)[1])


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
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        with contextlib.suppress(ValueError, IndexError):
            if line.startswith(WAITING):
                waiting += _value(line)
                seen = True
            elif line.startswith(RUNNING):
                running += _value(line)
                seen = True
            elif line.startswith(KV_USAGE):
                kv += _value(line)
                kv_engines += 1
                seen = True
            elif line.startswith(LORA_INFO):
                stamp = _value(line)
                if stamp > newest:
                    newest = stamp
                    adapters = _label(line, RUNNING_ADAPTERS) or b""
                    max_lora = int(_label(line, MAX_LORA) or 0)
            elif line.startswith(PROMPT_TOKENS):
                prompt += _value(line)
            elif line.startswith(PREFIX_HITS):
                hits += _value(line)
            elif line.startswith(PREFILL_TIME):
                prefill += _value(line)
            elif line.startswith(SUCCESS):
                success += _value(line)
            elif line.startswith(CACHE_INFO):
                block_size = int(_label(line, BLOCK_SIZE) or 0)
                blocks += int(_label(line, NUM_GPU_BLOCKS) or 0)  # per engine: data-parallel ranks add up
    if not seen:
        return None
    running_adapters = frozenset(name for name in adapters.decode("utf-8", "replace").split(",") if name)
    return EngineSample(
        waiting=waiting,
        running=running,
        kv_usage=kv / kv_engines if kv_engines else 0.0,
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
