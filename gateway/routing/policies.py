"""Routing policies: given the backends that serve a model, pick one. All share one signature.

The caller increments the chosen backend's in-flight count in the same step (no await in between),
so a burst of requests spreads even before any engine metric moves. Picks are synchronous and cheap
(a few microseconds for eight backends): no per-request structures beyond a small list.

Affinity policies keep no per-replica state: the backend for a prefix, session or adapter comes from
rendezvous hashing over the candidates, so several gateway replicas agree without talking. Load only
moves a request off its preferred backend (bounded load), in the same ranked order on every replica.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.fleet.registry import Backend, fresh_sample
from gateway.routing.adapter_homes import AdapterHomes
from gateway.routing.prefix_hash import name_key, prefix_key, rendezvous_score, session_key, url_hash
from gateway.routing.request import RequestInfo
from gateway.routing.settings import RoutingSettings


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


class RandomPick:
    """What a Kubernetes Service does: a uniformly random backend."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)


class RoundRobin:
    """Each backend in turn (one counter per gateway, so replicas interleave independently)."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        self._next += 1
        return candidates[self._next % len(candidates)]


class LeastLoad:
    """Lowest weighted score of engine queue, KV usage and this gateway's in-flight requests.

    A backend whose last scrape is older than `stale_after` has unknown engine load: it scores like the
    busiest backend with a fresh sample (never like an idle one), plus its in-flight count, which is
    always exact. Ties are broken at random so idle replicas share a burst.
    """

    def __init__(self, settings: RoutingSettings, rng: random.Random | None = None) -> None:
        weights = settings.weights
        self._w_queue = weights.queue
        self._w_kv = weights.kv
        self._w_inflight = weights.inflight
        self._w_running = weights.running
        self._stale_after = settings.stale_after
        self._rng = rng or random.Random()

    def scores(self, candidates: Sequence[Backend], now: float) -> list[float]:
        engine: list[float | None] = []
        worst = 0.0
        for backend in candidates:
            sample = fresh_sample(backend, now, self._stale_after)
            if sample is None:
                engine.append(None)
                continue
            value = self._w_queue * sample.waiting + self._w_kv * sample.kv_usage + self._w_running * sample.running
            worst = max(worst, value)
            engine.append(value)
        w_inflight = self._w_inflight
        return [
            (worst if value is None else value) + w_inflight * backend.inflight
            for value, backend in zip(engine, candidates, strict=True)
        ]

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        scores = self.scores(candidates, time.monotonic())
        best = min(scores)
        tied = [backend for backend, score in zip(candidates, scores, strict=True) if score - best < 1e-9]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class Affinity:
    """Sticky routing by rendezvous hashing with bounded load; the building block of the affinity policies.

    - sessions: the key is the session id (header, else the body's `user`);
    - prefixes: the key is the prompt's leading blocks;
    - adapters: a LoRA adapter's requests stay on the backends already running it, else go to a free
      adapter slot, at its `lora_backends` home backends first (adapter_homes.py: spread evenly, the
      same on every replica), so each server keeps a few adapters resident instead of swapping all of
      them through its slots.

    A preferred backend is left when it is overloaded: its in-flight count exceeds `load_factor` times
    the mean over the candidates plus `load_slack`, or its fresh engine queue exceeds `queue_threshold`.
    The next backend in rendezvous order is tried then, so replicas spill to the same place. Requests
    without a key, or when every backend is overloaded, go to the least-loaded backend.
    """

    def __init__(
        self,
        settings: RoutingSettings,
        rng: random.Random | None = None,
        *,
        prefixes: bool = True,
        sessions: bool = True,
        adapters: bool = True,
    ) -> None:
        self._least = LeastLoad(settings, rng)
        self._prefixes = prefixes
        self._sessions = sessions
        self._adapters = adapters
        self._prefix_chars = settings.prefix_chars
        self._block_chars = settings.prefix_block_chars
        self._session_header = settings.session_header.lower()
        self._factor = settings.load_factor
        self._slack = settings.load_slack
        self._margin = settings.spill_margin
        self._session_margin = settings.session_spill_margin
        self._queue_threshold = settings.queue_threshold
        self._stale_after = settings.stale_after
        self._url_hashes: dict[str, int] = {}  # backend url -> its rendezvous hash, computed once
        self._homes = AdapterHomes(settings.lora_backends, self._ranked)

    def _ranked(self, candidates: Sequence[Backend], key: int) -> list[Backend]:
        """Candidates in rendezvous order for `key`: the same on every replica, whatever the listing order."""
        hashes = self._url_hashes
        if len(hashes) > 4 * len(candidates) + 64:
            hashes.clear()  # backends come and go: keep the cache about the size of the fleet
        scored = []
        for backend in candidates:
            h = hashes.get(backend.url)
            if h is None:
                h = hashes[backend.url] = url_hash(backend.url)
            scored.append((rendezvous_score(key, h), backend))
        scored.sort(key=_first, reverse=True)
        return [backend for _, backend in scored]

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        if self._adapters and is_adapter(candidates[0], request.model):
            return self._pick_adapter(candidates, request)
        key = None
        margin = self._session_margin
        if self._sessions:
            key = session_key(request.model, request.payload, request.headers, self._session_header)
        if key is None and self._prefixes:
            key = prefix_key(request.model, request.payload, self._prefix_chars, self._block_chars)
            margin = self._margin
        if key is None:
            return self._least.pick(candidates, request)
        now = time.monotonic()
        limit = self._inflight_limit(candidates)
        ranked = self._ranked(candidates, key)
        first, second = ranked[0], ranked[1]
        if first.inflight > second.inflight + margin and not self._overloaded(second, limit, now):
            return second  # two choices: a key lives on its top two backends, the busier one yields
        for backend in ranked:
            if not self._overloaded(backend, limit, now):
                return backend
        return self._least.pick(candidates, request)

    def _pick_adapter(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        """Lowest (overloaded, tier, load, rank): an adapter goes where it already runs, else to a backend with a
        free adapter slot (its home first), and waits for another adapter's slot only when nothing else is left.

        What runs where is this gateway's own count of the adapters it keeps busy on each backend (exact at once)
        joined with the engine's report (the traffic of other gateway replicas); a batch runs at most `max_lora`
        adapters (vllm:lora_requests_info). Its homes (adapter_homes.py, the same on every replica) are where it
        was most likely loaded last, so they cost no load."""
        adapter = request.model
        now = time.monotonic()
        limit = self._inflight_limit(candidates)
        ranked = self._ranked(candidates, name_key(adapter))
        loads = self._least.scores(ranked, now)
        homes = self._homes.of(candidates, adapter)
        best: tuple[int, int, float, int] | None = None
        for rank, backend in enumerate(ranked):
            sample = fresh_sample(backend, now, self._stale_after)
            ours = backend.adapters_inflight
            reported = sample.running_adapters if sample is not None else frozenset()
            home = backend.url in homes
            if adapter in ours or adapter in reported:
                tier = 0  # already in its batch: no slot to wait for, no load cost
            elif sample is not None and sample.max_lora is not None:
                # A free slot (at home the adapter is likely still loaded), else a wait for one to free up.
                busy = len(reported) + sum(1 for name in ours if name not in reported)
                tier = (1 if home else 2) if busy < sample.max_lora else 3
            elif home:
                tier = 1  # no slot count reported (an older engine): home first, as the best guess
            elif sample is not None and not reported and not ours:
                tier = 2  # idle slots: loading costs little
            else:
                tier = 3
            entry = (1 if self._overloaded(backend, limit, now) else 0, tier, loads[rank], rank)
            if best is None or entry < best:
                best = entry
        assert best is not None
        return ranked[best[3]]

    def _inflight_limit(self, candidates: Sequence[Backend]) -> float:
        total = 0
        for backend in candidates:
            total += backend.inflight
        return self._factor * total / len(candidates) + self._slack

    def _overloaded(self, backend: Backend, limit: float, now: float) -> bool:
        if backend.inflight >= limit:
            return True
        sample = fresh_sample(backend, now, self._stale_after)
        return sample is not None and sample.waiting > self._queue_threshold


class PerModelPolicy:
    """Dispatches to the policy configured for the request's model."""

    def __init__(self, default: Policy, by_model: Mapping[str, Policy]) -> None:
        self._default = default
        self._by_model = by_model

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        return self._by_model.get(request.model, self._default).pick(candidates, request)


def _first(item: tuple[int, Backend]) -> int:
    return item[0]


def is_adapter(backend: Backend, model: str) -> bool:
    """True when `model` is a LoRA adapter on this backend (its card names a parent)."""
    card = backend.models.get(model)
    return card is not None and bool(card.get("parent"))
