"""Runs an `Engine` in real time: one asyncio task per simulated server steps the engine.

Steps follow an ideal timeline: a step that begins at t ends at t + duration, and the next one
begins at that ideal end, not at whenever the event loop got round to it, so a busy loop delivers
tokens a little late but does not stretch the model's timing. Only when the loop falls more than
`MAX_LAG_S` behind does the timeline resync to the clock.

A step's KV events go to `on_kv_events` (the publisher) through `call_soon`, so the step's tokens reach their
streams first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from worker.sim.engine import Engine, SimRequest
from worker.sim.kv_events import KVEvent

MAX_LAG_S = 5.0
log = logging.getLogger("worker.sim")


class EngineDriver:
    def __init__(self, engine: Engine, on_kv_events: Callable[[list[KVEvent]], None] | None = None) -> None:
        self.engine = engine
        self.on_kv_events = on_kv_events
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # how late steps ended against the ideal timeline (exported as sim:* metrics)
        self.steps = 0
        self.lag_sum_s = 0.0
        self.lag_max_s = 0.0
        self.resyncs = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, req: SimRequest) -> None:
        self.engine.add_request(req, self.now())
        if self._wake is not None:
            self._wake.set()

    def abort(self, req: SimRequest, reason: str = "abort") -> None:
        if not req.done:
            self.engine.abort_request(req, self.now(), reason)

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        engine = self.engine
        publish = self.on_kv_events
        t = loop.time()
        try:
            while True:
                duration = engine.begin_step(t) if engine.has_work() else None
                if duration is None:
                    self._wake.clear()
                    await self._wake.wait()
                    t = loop.time()
                    continue
                end = t + duration
                delay = end - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = loop.time() - end
                engine.end_step(end)
                if publish is not None:
                    events = engine.take_kv_events()
                    if events:
                        loop.call_soon(publish, events)
                self.steps += 1
                self.lag_sum_s += lag
                self.lag_max_s = max(self.lag_max_s, lag)
                now = loop.time()
                if now - end < MAX_LAG_S:
                    t = end
                else:
                    t = now
                    self.resyncs += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("simulated engine crashed")
            raise
