"""Discovery tells the registry WHERE backends are; each source implements `Discovery`."""

from __future__ import annotations

from typing import Protocol

from gateway.fleet.registry import Registry


class Discovery(Protocol):
    async def run(self, registry: Registry) -> None:
        """Keep `registry` in step with the source until cancelled (call `registry.reconcile`)."""
