"""Scrapes each backend's /metrics for the few vLLM gauges routing needs (HOW BUSY it is).

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
    kv_engines = 0
    seen = False
    newest = -1.0
    adapters = b""
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
    if not seen:
        return None
    running_adapters = frozenset(name for name in adapters.decode("utf-8", "replace").split(",") if name)
    return EngineSample(
        waiting=waiting,
        running=running,
        kv_usage=kv / kv_engines if kv_engines else 0.0,
        running_adapters=running_adapters,
        at=at,
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
