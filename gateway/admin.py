"""The fleet status view, GET /admin/fleet: what the gateway knows of every backend, as JSON, read-only.

Each model with its backends, and for each backend: health (model polls, /health checks, draining), passive
ejection, this gateway's in-flight requests and pending prefill, the engine's queue and KV usage with the age
of the scrape, the rates the cost model learned, and what the router knows of its prefix cache (the KV event
index's state and blocks, its event sources, and the approximate index's blocks). The endpoint exists only
when `admin.key_env` names a key; that key, not an API key, opens it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import RouteNotFound, Unauthorized
from gateway.fleet.kv_events import KvEventHub
from gateway.fleet.registry import Backend, Registry
from gateway.lifecycle import Lifecycle
from gateway.routing.admission import Admission
from gateway.routing.cache_aware import PrefixCaches


class FleetView:
    def __init__(
        self,
        registry: Registry,
        caches: PrefixCaches,
        hub: KvEventHub,
        admission: Admission,
        lifecycle: Lifecycle,
        admin_key: str | None,
    ) -> None:
        self._registry = registry
        self._caches = caches
        self._hub = hub
        self._admission = admission
        self._lifecycle = lifecycle
        self._digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None

    async def endpoint(self, request: Request) -> Response:
        if self._digest is None:
            raise RouteNotFound(f"No route matches {request.method} {request.url.path}.")
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("The admin endpoint needs `Authorization: Bearer <admin key>`.")
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest):
            raise Unauthorized("Incorrect admin key provided.")
        return JSONResponse(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        backends = {backend.url: self._backend(backend, now) for backend in self._registry.backends}
        models: dict[str, list[str]] = {}
        for backend in self._registry.backends:
            for model in backend.models:
                models.setdefault(model, []).append(backend.url)
        return {
            "gateway": {
                "draining": self._lifecycle.draining,
                "inflight": self._admission.inflight,
                "waiting": self._admission.waiting,
                "prefix_mode": self._caches.mode,
            },
            "models": [
                {
                    "model": model,
                    "routable": len(self._registry.candidates(model)),
                    "backends": [backends[url] for url in urls],
                }
                for model, urls in sorted(models.items())
            ],
            "backends": sorted(backends.values(), key=lambda entry: str(entry["url"])),
        }

    def _backend(self, backend: Backend, now: float) -> dict[str, Any]:
        sample = backend.engine
        ejected = max(backend.ejected_until - now, 0.0) if backend.ejected_until else 0.0
        return {
            "url": backend.url,
            "models": sorted(backend.models),
            "healthy": backend.healthy,
            "live": backend.live,
            "draining": backend.draining,
            "routable": backend.routable,
            "ejected_for_s": round(ejected, 3) if ejected else None,
            "consecutive_failures": backend.consecutive_failures,
            "inflight": backend.inflight,
            "prefill_pending_tokens": backend.prefill_pending,
            "last_error": backend.last_error,
            "engine": None
            if sample is None
            else {
                "waiting": sample.waiting,
                "running": sample.running,
                "kv_cache_usage": sample.kv_usage,
                "scrape_age_s": round(now - sample.at, 3),
                "block_size": sample.block_size,
                "num_blocks": sample.num_blocks,
            },
            "rates": {
                "prefill_seconds_per_token": backend.rates.prefill,
                "departures_per_second": backend.rates.departures,
            },
            "cache": self._cache(backend),
        }

    def _cache(self, backend: Backend) -> dict[str, Any]:
        entry = self._caches.kv.entry(backend.url)
        subscription = self._hub.subscription(backend.url)
        return {
            "state": self._caches.kv.state(backend.url).value,
            "blocks": entry.blocks if entry is not None else 0,
            "block_size": entry.block_size if entry is not None else None,
            "capacity_blocks": entry.capacity if entry is not None else None,
            "skipped_blocks": entry.skipped if entry is not None else 0,
            "approximate_blocks": self._caches.approximate.blocks(backend.url),
            "events": None
            if subscription is None
            else {
                "error": subscription.error,
                "sources": [
                    {
                        "endpoint": status.source.endpoint,
                        "replay_endpoint": status.source.replay_endpoint,
                        "rank": status.source.rank,
                        "connected": status.connected,
                        "last_seq": status.last_seq,
                        "events": status.events,
                        "lag_s": None if status.lag is None else round(status.lag, 3),
                    }
                    for status in subscription.sources
                ],
            },
        }
