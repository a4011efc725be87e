"""Which backends exist, what each one serves, and how busy the gateway keeps each one.

Every change to a backend goes through the registry's methods: discovery writes WHERE backends are
(`reconcile`), the model poller WHAT they serve (`set_models`, `mark_down`), the engine scraper HOW BUSY
they are (`record_engine`), health checks and outlier detection whether they may take requests
(`set_live`, `record_failure`, `eject`), and the request path its own in-flight count (`acquire`,
`release`). Everything runs on one event loop, so no locks are needed: a pick and its in-flight increment
happen in the same step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.fleet.engine_rates import EngineRates
from gateway.fleet.kv_protocol import KvSource

ModelCard = dict[str, Any]
# A model whose last backend left the fleet stays known this long: a replaced pod's successor may still be
# loading, and meanwhile its requests are unavailable (503, model_backends 0, alerts), not unknown (404).
DEPARTED_MODEL_S = 3600.0


@dataclass(frozen=True)
class BackendSpec:
    """What discovery knows about one backend."""

    url: str
    api_key: str | None = None
    draining: bool = False  # e.g. a terminating Kubernetes endpoint: no new requests, let in-flight finish
    kv_sources: tuple[KvSource, ...] = ()  # where its engines publish KV events (empty: ask the backend)


@dataclass(frozen=True, slots=True)
class EngineSample:
    """One scrape of a backend's /metrics (vLLM's own gauges), taken at `at` (time.monotonic())."""

    waiting: float
    running: float
    kv_usage: float  # 0..1
    running_adapters: frozenset[str] = frozenset()
    at: float = 0.0
    max_lora: int | None = None  # adapters a batch may run at once (vllm:lora_requests_info), None if unknown
    # Counters (totals since the engine started), from which the cost model learns its rates.
    prompt_tokens: float = 0.0
    prefix_hits: float = 0.0  # prompt tokens found in the prefix cache
    prefill_seconds: float = 0.0  # summed time requests spent in prefill
    finished: float = 0.0  # requests done, any reason
    # The KV cache's geometry (vllm:cache_config_info).
    block_size: int | None = None
    num_blocks: int | None = None

    def fresh(self, now: float, stale_after: float) -> bool:
        """Young enough to describe the engine now; an older sample means unknown load, never idle."""
        return now - self.at <= stale_after


def fresh_sample(backend: Backend, now: float, stale_after: float) -> EngineSample | None:
    """The backend's newest engine sample if it is fresh, else None (unknown)."""
    sample = backend.engine
    return sample if sample is not None and sample.fresh(now, stale_after) else None


@dataclass(eq=False)
class Backend:
    url: str
    api_key: str | None = None
    draining: bool = False
    kv_sources: tuple[KvSource, ...] = ()
    healthy: bool = False  # the last /v1/models poll succeeded
    live: bool = True  # active /health checks pass (or have not failed enough to say otherwise)
    ejected_until: float = 0.0  # passive outlier ejection: no new requests before this time.monotonic()
    consecutive_failures: int = 0  # connect errors and 5xx answers in a row (passive detection)
    ejections: int = 0  # ejections in a row; grows the next ejection's back-off
    models: dict[str, ModelCard] = field(default_factory=dict)  # kept while down, so the model stays "known"
    inflight: int = 0  # requests this gateway has open on it (changed in the same step as the pick)
    adapters_inflight: dict[str, int] = field(default_factory=dict)  # of those, per LoRA adapter
    prefill_pending: int = 0  # prompt tokens of those still waiting for their first token (predicted)
    engine: EngineSample | None = None  # the newest scrape; the policy decides when it is too old
    rates: EngineRates = field(default_factory=EngineRates)  # learned from the scrapes
    last_poll: float = 0.0
    last_error: str | None = None

    @property
    def routable(self) -> bool:
        return self.healthy and self.live and not self.draining and not self.ejected_until

    @property
    def routable_but_ejected(self) -> bool:
        """Ejected for its failures, and otherwise fit: the last resort of a model nothing else serves."""
        return bool(self.ejected_until) and self.healthy and self.live and not self.draining

    def __repr__(self) -> str:
        return f"Backend({self.url!r}, healthy={self.healthy}, draining={self.draining}, inflight={self.inflight})"


class Registry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._routable: dict[str, tuple[Backend, ...]] = {}
        self._known: frozenset[str] = frozenset()
        self._departed_models: dict[str, float] = {}  # model -> when its last backend left (time.monotonic())
        self.changed = asyncio.Event()  # set when backends come or go, so the poller looks at new ones at once
        # Bumped whenever an engine sample lands or the routable sets change: what is derived from them (the
        # admission's saturation) is recomputed only then.
        self.engine_version = 0

    # -- discovery side -------------------------------------------------------------------------------

    def reconcile(self, specs: Iterable[BackendSpec]) -> None:
        """Make the set of backends equal to `specs`. Removed backends leave at once; requests already
        holding one finish on their own reference."""
        wanted = {spec.url: spec for spec in specs}
        added = False
        leaving: set[str] = set()
        for url in list(self._backends):
            if url not in wanted:
                leaving.update(self._backends.pop(url).models)
        for url, spec in wanted.items():
            backend = self._backends.get(url)
            if backend is None:
                self._backends[url] = Backend(
                    url=url, api_key=spec.api_key, draining=spec.draining, kv_sources=spec.kv_sources
                )
                added = True
            else:
                backend.api_key = spec.api_key
                backend.draining = spec.draining
                backend.kv_sources = spec.kv_sources
        self._rebuild()
        now = time.monotonic()
        for model in leaving - self._known:
            self._departed_models[model] = now
        if added:
            self.changed.set()

    # -- model poller side ----------------------------------------------------------------------------

    def set_models(self, backend: Backend, cards: Iterable[ModelCard]) -> None:
        models = {str(card["id"]): card for card in cards if isinstance(card, dict) and "id" in card}
        changed = not backend.healthy or models.keys() != backend.models.keys()
        backend.models = models
        backend.healthy = True
        backend.last_error = None
        backend.last_poll = time.monotonic()
        if changed:
            self._rebuild()

    def mark_down(self, backend: Backend, reason: str) -> None:
        backend.last_error = reason
        backend.last_poll = time.monotonic()
        if backend.healthy:
            backend.healthy = False
            self._rebuild()

    def set_live(self, backend: Backend, live: bool) -> None:
        if backend.live != live:
            backend.live = live
            self._rebuild()

    def eject(self, backend: Backend, until: float) -> None:
        backend.ejected_until = until
        backend.ejections += 1
        backend.consecutive_failures = 0
        self._rebuild()

    def readmit(self, backend: Backend) -> None:
        if backend.ejected_until:
            backend.ejected_until = 0.0
            self._rebuild()

    def record_failure(self, backend: Backend) -> int:
        """A connect error or 5xx seen by a request; returns the failures in a row."""
        backend.consecutive_failures += 1
        return backend.consecutive_failures

    def record_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        if backend.ejections and not backend.ejected_until:
            backend.ejections = 0

    # -- engine scraper side --------------------------------------------------------------------------

    def record_engine(self, backend: Backend, sample: EngineSample) -> None:
        backend.engine = sample
        backend.rates.learn(sample)
        self.engine_version += 1

    def _rebuild(self) -> None:
        routable: dict[str, list[Backend]] = {}
        known: set[str] = set()
        ejected: list[Backend] = []
        for backend in self._backends.values():
            known.update(backend.models)
            if backend.routable:
                for model in backend.models:
                    routable.setdefault(model, []).append(backend)
            elif backend.routable_but_ejected:
                ejected.append(backend)
        # An ejection takes a backend out of the models others serve too; a model (an adapter, say) that only
        # ejected backends serve keeps them: failing partly beats failing wholly.
        last_resort: dict[str, list[Backend]] = {}
        for backend in ejected:
            for model in backend.models:
                if model not in routable:
                    last_resort.setdefault(model, []).append(backend)
        routable.update(last_resort)
        self._routable = {model: tuple(backends) for model, backends in routable.items()}
        self._known = frozenset(known)
        for model in [model for model in self._departed_models if model in known]:
            del self._departed_models[model]  # served again
        self.engine_version += 1

    # -- request side ---------------------------------------------------------------------------------

    @staticmethod
    def acquire(backend: Backend, adapter: str | None = None) -> None:
        """Count a request going to `backend` (in the same step as its pick: no await in between), and the LoRA
        adapter it runs there: the gateway knows which adapters it keeps busy before any scrape shows them."""
        backend.inflight += 1
        if adapter is not None:
            backend.adapters_inflight[adapter] = backend.adapters_inflight.get(adapter, 0) + 1

    @staticmethod
    def release(backend: Backend, adapter: str | None = None) -> None:
        backend.inflight -= 1
        if adapter is not None:
            left = backend.adapters_inflight.get(adapter, 0) - 1
            if left > 0:
                backend.adapters_inflight[adapter] = left
            else:
                backend.adapters_inflight.pop(adapter, None)

    @staticmethod
    def charge_prefill(backend: Backend, tokens: int) -> None:
        """Prompt tokens a request sent to `backend` will have it compute, until its first token (negative: done)."""
        backend.prefill_pending += tokens

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(self._backends.values())

    def candidates(self, model: str) -> tuple[Backend, ...]:
        """Backends that may take a new request for `model` now."""
        return self._routable.get(model, ())

    def out_of_service(self, url: str) -> bool:
        """A backend at `url` is in the fleet but takes no new requests now (down, failing checks, ejected,
        draining)."""
        backend = self._backends.get(url)
        return backend is not None and not backend.routable

    def routable_backends(self) -> tuple[Backend, ...]:
        return tuple(backend for backend in self._backends.values() if backend.routable)

    def is_known(self, model: str) -> bool:
        """True when some current backend served `model` at its last successful poll (even if down now), or
        the last one to serve it left the fleet less than DEPARTED_MODEL_S ago."""
        return model in self._known or model in self._recently_departed()

    def _recently_departed(self) -> dict[str, float]:
        departed = self._departed_models
        if departed:
            oldest = time.monotonic() - DEPARTED_MODEL_S
            for model in [model for model, since in departed.items() if since < oldest]:
                del departed[model]
        return departed

    def backends_per_model(self) -> dict[str, int]:
        """Every known model with how many backends may take its requests now (0: none)."""
        return {model: len(self._routable.get(model, ())) for model in (*self._known, *self._recently_departed())}

    def served_models(self) -> list[str]:
        return sorted(self._routable)

    def cards(self) -> list[ModelCard]:
        """One card per model id over routable backends; base models first, then adapters, by id."""
        merged: dict[str, ModelCard] = {}
        for model, backends in self._routable.items():
            merged[model] = backends[0].models[model]
        return sorted(merged.values(), key=lambda card: (card.get("parent") is not None, str(card["id"])))

    def ready(self) -> bool:
        return bool(self._routable)
