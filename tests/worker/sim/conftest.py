"""Fixtures: simulated servers on real loopback ports, in-process (uvicorn task) or as a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from worker.sim.config import SimConfig
from worker.sim.embedded import RunningSim, serve_sim

__all__ = ["RunningSim", "SimFactory", "sim_process"]

FAST: dict[str, Any] = {"decode_ms_per_token": 2.0, "prefill_ms_per_token": 0.01, "lora_load_ms": 1.0}


@contextlib.asynccontextmanager
async def run_sim(**overrides: Any) -> AsyncIterator[RunningSim]:
    config = SimConfig(**{"served_model_name": "sim", "port": 0, **FAST, **overrides})
    async with serve_sim(config) as running:
        yield running


SimFactory = Callable[..., contextlib.AbstractAsyncContextManager[RunningSim]]


@pytest.fixture
def sim_factory() -> SimFactory:
    return run_sim


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with run_sim(loras={"sim-lora": "/loras/sim-lora"}) as running:
        yield running


class SimProcess:
    def __init__(self, proc: subprocess.Popen[str], urls: list[str]) -> None:
        self.proc = proc
        self.urls = urls


@contextlib.contextmanager
def sim_process(*args: str, count: int = 1) -> Iterator[SimProcess]:
    """`python -m worker.sim ARGS --port 0`, waiting for its "serving ... on URL" lines."""
    cmd = [sys.executable, "-m", "worker.sim", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    urls: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        while len(urls) < count and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"on (http://\S+)", line)
            if match:
                urls.append(match.group(1))
        if len(urls) < count:
            proc.kill()
            raise RuntimeError(f"simulator did not start: {proc.stderr.read() if proc.stderr else ''}")
        for url in urls:
            httpx.get(url + "/health", timeout=5)
        yield SimProcess(proc, urls)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
