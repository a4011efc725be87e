"""Routing policies: given the backends that serve a model, pick one. All share one signature.

The caller increments the chosen backend's in-flight count in the same step (no await in between),
so a burst of requests spreads even before any engine metric moves.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.registry import Backend
from gateway.routing_settings import RoutingSettings


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy may look at: the model, the parsed body (None for multipart), and the headers."""

    model: str
    route: str
    payload: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    tenant: str = ""  # API key name, or the client address when no keys are configured
    priority: str = "normal"


class Policy(Protocol):
    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        """Choose one of `candidates` (never empty)."""


class LeastInflight:
    """Fewest in-flight requests counted by this gateway; ties broken at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        fewest = min(backend.inflight for backend in candidates)
        best = [backend for backend in candidates if backend.inflight == fewest]
        return best[0] if len(best) == 1 else self._rng.choice(best)


class PerModelPolicy:
    """Dispatches to the policy configured for the request's model."""

    def __init__(self, default: Policy, by_model: Mapping[str, Policy]) -> None:
        self._default = default
        self._by_model = by_model

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return self._by_model.get(request.model, self._default).pick(candidates, request)


def build_policy(settings: RoutingSettings, rng: random.Random | None = None) -> Policy:
    def make(name: str) -> Policy:
        return LeastInflight(rng)

    default = make(settings.policy)
    if not settings.models:
        return default
    return PerModelPolicy(default, {model: make(name) for model, name in settings.models.items()})
