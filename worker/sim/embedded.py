"""Run simulated servers inside the caller's event loop (for tests and benchmarks).

async with serve_sim(SimConfig(served_model_name="m", decode_ms_per_token=2)) as sim:
    httpx.get(sim.url + "/health")      # a real loopback port, picked by the OS
    sim.app.state.engine                # the engine model, for white-box assertions
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from worker.sim.config import SimConfig
from worker.sim.server import SimApp, create_sim_app


@dataclass(frozen=True)
class RunningSim:
    app: SimApp
    url: str  # http://host:port, without /v1


class _EmbeddedServer(uvicorn.Server):
    """Leaves the host process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_sim(config: SimConfig) -> AsyncIterator[RunningSim]:
    """Serve one simulated server on `config.host:config.port` (port 0: any free port)."""
    app = create_sim_app(config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                               lifespan="on", timeout_graceful_shutdown=1)  # fmt: skip
    server = _EmbeddedServer(uv_config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the startup error (e.g. port in use)
            raise RuntimeError("the simulated server stopped during startup")
        await asyncio.sleep(0.005)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield RunningSim(app, f"http://{host}:{port}")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
