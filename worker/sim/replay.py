"""Offline replay of the engine model on a virtual clock: what timings the model predicts.

`replay(config, arrivals)` feeds requests to an `Engine` at their arrival times and steps it
exactly as `driver.EngineDriver` does in real time (an idle engine starts a step as soon as a
request arrives; otherwise steps run back to back). `bench/sim_capacity.py` compares a live
server against this prediction.
"""

from __future__ import annotations

from collections.abc import Iterable

from worker.sim.config import SimConfig
from worker.sim.engine import Engine, SimRequest


def replay(config: SimConfig, arrivals: Iterable[tuple[float, SimRequest]]) -> list[SimRequest]:
    """Run every request to completion; returns them with their timestamps filled in."""
    pending = sorted(arrivals, key=lambda item: item[0])
    engine = Engine(config)
    done = [req for _, req in pending]
    i, t = 0, 0.0
    while i < len(pending) or engine.has_work():
        if not engine.has_work():
            t = max(t, pending[i][0])
        while i < len(pending) and pending[i][0] <= t:
            engine.add_request(pending[i][1], pending[i][0])
            i += 1
        duration = engine.begin_step(t)
        if duration is None:
            continue
        t += duration
        engine.end_step(t)
    return done
