"""`SimState`: everything one simulated server owns (engine, driver, metrics, adapters, faults)."""

from __future__ import annotations

import os
import random
import time

from worker.sim.config import SimConfig
from worker.sim.driver import EngineDriver
from worker.sim.engine import Engine
from worker.sim.metrics import SimMetrics
from worker.sim.protocol import model_not_found


class SimState:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.driver = EngineDriver(self.engine)
        self.metrics = SimMetrics(self.engine, config.served_model_name, self.driver)
        self.loras: dict[str, str] = dict(config.loras)  # adapter name -> path, runtime loads included
        self.rng = random.Random(config.seed)
        self.accepted_requests = 0
        self.started_at = time.monotonic()

    def ready(self) -> bool:
        """False during `--slow-start`: /health and /v1/models answer 503."""
        return time.monotonic() - self.started_at >= self.config.slow_start_s

    def resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """(name to report, LoRA adapter or None); no name means the base model, as in vLLM."""
        base = self.config.served_model_name
        if name is None or name == base:
            return base, None
        if name in self.loras:
            return name, name
        raise model_not_found(name, base)

    def accept_generation(self) -> bool:
        """Count a generation request; True for the last one `--exit-after-requests N` allows.

        The process then exits (os._exit(1)) right after answering that N-th request; a request
        that arrives beyond the N-th meanwhile kills it at once.
        """
        self.accepted_requests += 1
        limit = self.config.exit_after_requests
        if limit is None:
            return False
        if self.accepted_requests > limit:
            os._exit(1)
        return self.accepted_requests == limit

    def should_fail(self) -> bool:
        return self.config.fail_rate > 0 and self.rng.random() < self.config.fail_rate
