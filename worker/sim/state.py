"""`SimState`: everything one simulated server owns (engine, driver, metrics, adapters, faults)."""

from __future__ import annotations

import os
import random
import time
import zlib

from worker.sim.config import SimConfig
from worker.sim.driver import EngineDriver
from worker.sim.engine import Engine
from worker.sim.kv_publisher import KVEventPublisher
from worker.sim.metrics import SimMetrics
from worker.sim.protocol import model_not_found

SIM_VERSION = "0.0.0+switchyard.sim"


class SimState:
    def __init__(self, config: SimConfig, publisher: KVEventPublisher | None = None) -> None:
        self.config = config
        self.engine = Engine(config)
        if publisher is None and config.kv_events.publishing:
            publisher = KVEventPublisher(config.kv_events, config.host)
        self.publisher = publisher
        self.driver = EngineDriver(self.engine, publisher.publish if publisher is not None else None)
        self.metrics = SimMetrics(self.engine, config.served_model_name, self.driver)
        self.loras: dict[str, str] = dict(config.loras)  # adapter name -> path, runtime loads included
        # adapter ids as vLLM numbers them (lora_id in KV events): 1, 2, ... in load order, kept on reload
        self.lora_ids: dict[str, int] = {name: i for i, name in enumerate(config.loras, start=1)}
        self._next_lora_id = len(config.loras) + 1
        self.fingerprint = f"vllm-{SIM_VERSION}-{zlib.crc32(repr(config).encode()):08x}"
        self.rng = random.Random(config.seed)
        self.accepted_requests = 0
        self.started_at = time.monotonic()

    def ready(self) -> bool:
        """False during `--slow-start`: /health and /v1/models answer 503."""
        return time.monotonic() - self.started_at >= self.config.slow_start_s

    def add_lora(self, name: str, path: str) -> None:
        self.loras[name] = path
        if name not in self.lora_ids:
            self.lora_ids[name] = self._next_lora_id
            self._next_lora_id += 1

    def remove_lora(self, name: str) -> None:
        del self.loras[name]
        self.lora_ids.pop(name, None)

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
