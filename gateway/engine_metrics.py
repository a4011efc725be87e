"""Scrapes each backend's /metrics for the few vLLM gauges routing needs (HOW BUSY it is).

Only the needed lines are parsed; scrapes run concurrently with a timeout and never touch the request
path, which just reads `backend.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from gateway.registry import Backend, EngineSample, Registry
from gateway.routing_settings import RoutingSettings

WAITING = b"vllm:num_requests_waiting{"
RUNNING = b"vllm:num_requests_running{"
KV_USAGE = b"vllm:kv_cache_usage_perc{"


def parse_engine_sample(text: bytes, at: float) -> EngineSample | None:
    """The sums of vLLM's queue, batch and KV gauges over engines, or None if they are absent."""
    values = {WAITING: 0.0, RUNNING: 0.0, KV_USAGE: 0.0}
    seen = 0
    for line in text.split(b"\n"):
        if not line.startswith(b"vllm:"):
            continue
        for prefix in values:
            if line.startswith(prefix):
                with contextlib.suppress(ValueError, IndexError):
                    values[prefix] += float(line.rsplit(b" ", 1)[1])
                    seen += 1
                break
    if not seen:
        return None
    return EngineSample(waiting=values[WAITING], running=values[RUNNING], kv_usage=values[KV_USAGE], at=at)


class EngineScraper:
    def __init__(self, registry: Registry, session: aiohttp.ClientSession, settings: RoutingSettings) -> None:
        self._registry = registry
        self._session = session
        self._interval = settings.scrape_interval
        self._timeout = aiohttp.ClientTimeout(total=settings.scrape_timeout)

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(b) for b in self._registry.backends if b.healthy))
            await asyncio.sleep(self._interval)

    async def _scrape(self, backend: Backend) -> None:
        try:
            async with self._session.get(f"{backend.url}/metrics", timeout=self._timeout) as response:
                if response.status != 200:
                    return
                text = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return  # the sample ages and counts as unknown
        sample = parse_engine_sample(text, time.monotonic())
        if sample is not None:
            backend.engine = sample
