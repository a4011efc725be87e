"""Open-loop load generator: Poisson arrivals of streamed OpenAI requests, timing each one.

Requests are sent at exponential inter-arrival times whatever the server does (open loop), so a
saturated fleet shows up as growing latency rather than as a slower client. Each request records
when it was sent, when its first content token arrived (TTFT) and when `[DONE]` arrived.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

FIRST_CONTENT = re.compile(rb'"(?:content|text)":"[^"]')


@dataclass
class Request:
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    on_done: Callable[[str], None] | None = None  # called with the answer's text: a chat may send its next turn


@dataclass
class Result:
    sent: float
    first: float | None = None
    done: float | None = None
    status: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first is not None and self.done is not None


def answer_text(stream: bytes) -> str:
    """The content a streamed chat answer carried, from its SSE events."""
    parts = []
    for line in stream.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or choice.get("text") or "")
    return "".join(parts)


async def _one(session: aiohttp.ClientSession, url: str, request: Request, result: Result) -> None:
    body: list[bytes] = []
    try:
        async with session.post(url + request.path, json=request.body, headers=request.headers) as response:
            result.status = response.status
            if response.status != 200:
                await response.read()
                return
            tail = b""
            async for data in response.content.iter_any():
                if result.first is None and FIRST_CONTENT.search(tail[-16:] + data):
                    result.first = time.perf_counter()
                tail = (tail + data)[-32:]
                if request.on_done is not None:
                    body.append(data)
            if tail.endswith(b"data: [DONE]\n\n"):
                result.done = time.perf_counter()
            else:
                result.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = type(exc).__name__
    finally:
        if request.on_done is not None:
            request.on_done(answer_text(b"".join(body)))


async def run(
    urls: list[str],
    make: Callable[[random.Random], Request],
    rate: float,
    duration: float,
    seed: int,
    pick_url: Callable[[random.Random, list[str]], str] | None = None,
) -> tuple[list[Result], float]:
    """Send Poisson(rate) requests for `duration` seconds; returns the results and the wall time
    from the first send to the last completion. `pick_url` chooses the target per request (random
    direct); by default the first URL (a gateway) takes everything.

    Arrival times, workload draws and URL picks each have their own generator seeded from `seed`,
    so every target sees the same arrivals and the same requests: with one shared generator, the
    random-direct row's URL draws shifted its arrivals and it was offered a different load."""
    arrivals, draws, picks = (random.Random(f"{seed}:{part}") for part in ("arrivals", "draws", "picks"))
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=300)
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        at = start
        while True:
            at += arrivals.expovariate(rate)
            if at - start > duration:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            url = pick_url(picks, urls) if pick_url is not None else urls[0]
            result = Result(sent=time.perf_counter())
            results.append(result)
            tasks.append(asyncio.create_task(_one(session, url, make(draws), result)))
        await asyncio.gather(*tasks)
        ends = [r.done or r.sent for r in results]
        return results, (max(ends) - start) if ends else 0.0
