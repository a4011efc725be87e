"""Backend health: active GET /health checks and passive outlier ejection with a growing back-off.

Active checks catch a backend whose engine died while its HTTP server still answers; passive ejection
reacts within a few requests to one that refuses connections or answers 5xx, long before the next check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from gateway.fleet.registry import Backend, Registry
from gateway.settings import HealthSettings

log = logging.getLogger("switchyard.health")


class HealthChecker:
    def __init__(
        self,
        registry: Registry,
        session: aiohttp.ClientSession,
        settings: HealthSettings,
        abandon: Callable[[str, str], None] | None = None,
    ) -> None:
        self._registry = registry
        self._session = session
        self._settings = settings
        self._abandon = abandon  # (url, reason): fail its requests still waiting for a response head
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        # Passes (> 0) or failures (< 0) in a row, per backend object rather than URL: a backend that left and
        # came back at the same address (a new pod given the old one's IP) starts a streak of its own.
        self._streaks: dict[Backend, int] = {}

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.interval)

    async def check_all(self) -> None:
        """One round: every current backend checked once; the streaks of backends that left are dropped."""
        backends = self._registry.backends
        await asyncio.gather(*(self._check(backend) for backend in backends))
        current = set(self._registry.backends)
        for gone in [backend for backend in self._streaks if backend not in current]:
            del self._streaks[gone]

    async def _check(self, backend: Backend) -> None:
        try:
            async with self._session.get(f"{backend.url}/health", timeout=self._timeout) as response:
                passed = response.status == 200
                reason = f"/health answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            passed, reason = False, f"/health failed: {exc.__class__.__name__}"
        streak = self._streaks.get(backend, 0)
        streak = max(streak, 0) + 1 if passed else min(streak, 0) - 1
        self._streaks[backend] = streak
        if passed and not backend.live and streak >= self._settings.healthy_threshold:
            log.info("backend %s passes health checks again", backend.url)
            self._registry.set_live(backend, True)
            self._registry.changed.set()  # learn its models again at once
        elif not passed and backend.live and -streak >= self._settings.unhealthy_threshold:
            log.warning("backend %s failed %d health checks: %s", backend.url, -streak, reason)
            self._registry.set_live(backend, False)
            if self._abandon is not None:
                self._abandon(backend.url, f"the backend failed {-streak} health checks before it answered")


class OutlierDetector:
    """Counts consecutive failures per backend as requests see them and ejects repeat offenders."""

    def __init__(self, registry: Registry, settings: HealthSettings) -> None:
        self._registry = registry
        self._settings = settings

    def failure(self, backend: Backend) -> None:
        failures = self._registry.record_failure(backend)
        if failures < self._settings.eject_after or backend.ejected_until:
            return
        if not self._others_remain(backend):
            return  # nothing would change: every model it serves would keep it as its last resort
        seconds = min(self._settings.eject_base * 2**backend.ejections, self._settings.eject_max)
        log.warning("backend %s ejected for %.1f s after %d failures", backend.url, seconds, failures)
        self._registry.eject(backend, time.monotonic() + seconds)
        asyncio.get_running_loop().call_later(seconds, self._registry.readmit, backend)

    def _others_remain(self, backend: Backend) -> bool:
        """Some model it serves has another backend to take its requests (the registry keeps an ejected backend
        for the models no other serves)."""
        return any(any(other is not backend for other in self._registry.candidates(model)) for model in backend.models)

    def success(self, backend: Backend) -> None:
        self._registry.record_success(backend)
