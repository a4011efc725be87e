"""Backends listed in the configuration file: reconciled once, never changed."""

from __future__ import annotations

from gateway.fleet.kv_protocol import KvSource
from gateway.fleet.registry import BackendSpec, Registry
from gateway.settings import BackendSettings


def _spec(backend: BackendSettings) -> BackendSpec:
    events = backend.kv_events
    sources = () if events is None else (KvSource(events.endpoint, events.replay_endpoint, events.topic),)
    return BackendSpec(url=backend.url, api_key=backend.api_key(), kv_sources=sources)


class StaticDiscovery:
    def __init__(self, backends: list[BackendSettings]) -> None:
        self._specs = [_spec(backend) for backend in backends]

    async def run(self, registry: Registry) -> None:
        registry.reconcile(self._specs)
