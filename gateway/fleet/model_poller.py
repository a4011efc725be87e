"""Learns WHAT each backend serves by polling its GET /v1/models; a failed poll marks it down."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from gateway.fleet.registry import Backend, Registry

log = logging.getLogger("switchyard.models")


class ModelPoller:
    def __init__(self, registry: Registry, session: aiohttp.ClientSession, interval: float, timeout: float) -> None:
        self._registry = registry
        self._session = session
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def run(self) -> None:
        """Poll every backend each interval, and at once when discovery adds one."""
        changed = self._registry.changed
        while True:
            changed.clear()
            await self.poll_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await changed.wait()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self._poll(backend) for backend in self._registry.backends))

    async def _poll(self, backend: Backend) -> None:
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        try:
            async with self._session.get(
                f"{backend.url}/v1/models", headers=headers, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    self._down(backend, f"GET /v1/models answered {response.status}")
                    return
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._down(backend, f"GET /v1/models failed: {exc.__class__.__name__}: {exc}")
            return
        cards = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(cards, list):
            self._down(backend, "GET /v1/models did not return a model list")
            return
        was_healthy = backend.healthy
        self._registry.set_models(backend, cards)
        if not was_healthy:
            log.info("backend %s up, serving %s", backend.url, ", ".join(sorted(backend.models)) or "nothing")

    def _down(self, backend: Backend, reason: str) -> None:
        if backend.healthy or backend.last_poll == 0.0:
            log.warning("backend %s down: %s", backend.url, reason)
        self._registry.mark_down(backend, reason)
