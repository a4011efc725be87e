"""Routing policies: given the backends that serve a model, pick one. All share one signature.

The caller increments the chosen backend's in-flight count in the same step (no await in between),
so a burst of requests spreads even before any engine metric moves.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from gateway.registry import Backend


class Policy(Protocol):
    def pick(self, model: str, candidates: Sequence[Backend]) -> Backend:
        """Choose one of `candidates` (never empty)."""


class LeastInflight:
    """Fewest in-flight requests counted by this gateway; ties broken at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, model: str, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        fewest = min(backend.inflight for backend in candidates)
        best = [backend for backend in candidates if backend.inflight == fewest]
        return best[0] if len(best) == 1 else self._rng.choice(best)
