"""The proxy's picker: the configured policy's choice, counted in flight on the chosen backend in the same step."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.fleet.registry import Backend, Registry
from gateway.routing.policies import Policy
from gateway.routing.request import RequestInfo


class Router:
    def __init__(self, policy: Policy, registry: Registry) -> None:
        self._policy = policy
        self._registry = registry

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        backend = self._policy.pick(candidates, request)
        self._registry.acquire(backend)  # no await between the pick and the count: bursts spread at once
        return backend

    def release(self, backend: Backend) -> None:
        self._registry.release(backend)
