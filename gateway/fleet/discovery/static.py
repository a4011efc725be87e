"""Backends listed in the configuration file: reconciled once, never changed."""

from __future__ import annotations

from gateway.fleet.registry import BackendSpec, Registry
from gateway.settings import BackendSettings


class StaticDiscovery:
    def __init__(self, backends: list[BackendSettings]) -> None:
        self._specs = [BackendSpec(url=backend.url, api_key=backend.api_key()) for backend in backends]

    async def run(self, registry: Registry) -> None:
        registry.reconcile(self._specs)
