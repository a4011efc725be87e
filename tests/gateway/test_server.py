"""The gateway process's own tuning: its collector settings, and the startup objects frozen once it serves."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.lifecycle import Lifecycle
from gateway.server import GC_YOUNG_THRESHOLD, DrainingServer, widen_young_generation


@pytest.fixture
def gc_state() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_widen_young_generation_keeps_the_older_thresholds(gc_state: None) -> None:
    gc.set_threshold(700, 11, 12)
    widen_young_generation()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)


def test_startup_freezes_what_the_lifespan_built(gc_state: None) -> None:
    built: list[object] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        built.append({"resource": [1, 2, 3]})  # a long-lived, GC-tracked object the lifespan made
        yield

    async def serve() -> None:
        config = uvicorn.Config(Starlette(lifespan=lifespan), port=0, lifespan="on", log_level="warning")
        server = DrainingServer(config, Lifecycle(), drain_delay=0)
        gc.unfreeze()
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "the server stopped before it started"
            await asyncio.sleep(0.01)
        try:
            assert gc.get_freeze_count() > 0
            assert not any(obj is built[0] for obj in gc.get_objects())  # out of every generation's scans
        finally:
            server.should_exit = True
            await task

    asyncio.run(serve())
