"""Predicted time to first token of one request on one backend:

    wait in the engine's queue  +  seconds per prompt token  x  (prompt tokens not cached there
                                                                 + prompt tokens this gateway sent there
                                                                   that are still waiting for a first token)

The per-token prefill cost and the engine's departure rate are learned from each backend's scraped counters
(fleet/engine_rates.py); a backend that has not shown its own yet borrows the mean of the model's other
backends, and only a fleet that has shown nothing uses the configured prior. A backend's own prefill figure
is shrunk toward that mean by how little evidence is behind it (EVIDENCE_TOKENS): the first windows of
identical engines measure 20% apart by chance (a request's prefill lands on a decode step or not), and at
light load the one that happened to measure fastest would otherwise win every pick its bounded load allows;
a truly slower engine still shows as slower within a few tens of thousands of its tokens. The queue wait is the engine's
queue over its departure rate (Little's law); a backend whose scrape is stale or missing is assumed to have
the longest queue among those with a fresh one: unknown load is never mistaken for idle.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.fleet.registry import Backend, EngineSample

EVIDENCE_TOKENS = 20_000  # computed prompt tokens after which a backend's own prefill figure weighs half


class CostModel:
    def __init__(self, prior_prefill_seconds: float) -> None:
        self._prior = prior_prefill_seconds

    def prefill_rate(self, candidates: Sequence[Backend]) -> float:
        """Seconds per computed prompt token for this group of backends (the mean of those that know theirs)."""
        total = 0.0
        known = 0
        for backend in candidates:
            rate = backend.rates.prefill
            if rate is not None:
                total += rate
                known += 1
        return total / known if known else self._prior

    def ttft(
        self,
        candidates: Sequence[Backend],
        uncached: Sequence[float],
        samples: Sequence[EngineSample | None],
        fallback: float,
    ) -> list[float]:
        """Predicted seconds to first token on each candidate, given the prompt tokens each would compute, its
        fresh engine sample (None: stale or missing) and the group's prefill rate (`prefill_rate`)."""
        worst = 0.0
        for sample in samples:
            if sample is not None and sample.waiting > worst:
                worst = sample.waiting
        costs = []
        for backend, tokens, sample in zip(candidates, uncached, samples, strict=True):
            rates = backend.rates
            own = rates.prefill
            if own is None:
                rate = fallback
            else:
                seen = rates.prefill_tokens
                rate = fallback + (own - fallback) * seen / (seen + EVIDENCE_TOKENS)
            waiting = worst if sample is None else sample.waiting
            departures = rates.departures
            if waiting <= 0:
                wait = 0.0
            elif departures:
                wait = waiting / departures
            else:  # no departures seen yet: each request ahead needs at least a prefill like this one
                wait = waiting * rate * max(tokens, 1.0)
            costs.append(wait + rate * (tokens + backend.prefill_pending))
        return costs
