"""Where each LoRA adapter of a model lives: its home backends, spread evenly over the backends that serve it.

A home is where the adapter most likely still sits in an adapter slot, so a request sent there costs no load.
Rendezvous hashing alone drops adapters on backends like balls into bins: 16 adapters on 8 backends give some
backends 3 or 4 homes and others none, and a backend home to more adapters than it has slots swaps them in
and out, each swap a load that the request waiting for it pays. Here the adapters, taken in the order of their
own hashes, each take their highest-ranked backends that still have room (each backend takes at most its share:
adapters x homes per adapter / backends, rounded up). Every gateway replica that sees the same backends and
adapters computes the same homes, with nothing shared between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from gateway.fleet.registry import Backend
from gateway.routing.prefix_hash import name_key

Ranked = Callable[[Sequence[Backend], int], list[Backend]]  # candidates in rendezvous order for a key


class AdapterHomes:
    def __init__(self, per_adapter: int, ranked: Ranked) -> None:
        self._per_adapter = per_adapter
        self._ranked = ranked
        # (candidate urls, their model cards counted) -> each adapter's home urls; recomputed when either changes
        self._homes: dict[tuple[tuple[str, ...], int], dict[str, frozenset[str]]] = {}

    def of(self, candidates: Sequence[Backend], adapter: str) -> frozenset[str]:
        """The urls of `adapter`'s home backends among `candidates` (the backends that serve it)."""
        key = (tuple(backend.url for backend in candidates), sum(len(backend.models) for backend in candidates))
        homes = self._homes.get(key)
        if homes is None:
            if len(self._homes) > 64:
                self._homes.clear()  # fleets and adapter sets change now and then: keep only recent ones
            homes = self._homes[key] = self._place(candidates)
        return homes.get(adapter, frozenset())

    def _place(self, candidates: Sequence[Backend]) -> dict[str, frozenset[str]]:
        names = {name for backend in candidates for name, card in backend.models.items() if card.get("parent")}
        adapters = sorted(names, key=name_key)
        per_adapter = min(self._per_adapter, len(candidates))
        share = math.ceil(len(adapters) * per_adapter / len(candidates)) if candidates else 0
        room = {backend.url: share for backend in candidates}
        homes: dict[str, frozenset[str]] = {}
        for adapter in adapters:
            chosen: list[str] = []
            for backend in self._ranked(candidates, name_key(adapter)):
                if adapter in backend.models and room[backend.url] > 0:
                    room[backend.url] -= 1
                    chosen.append(backend.url)
                    if len(chosen) == per_adapter:
                        break
            homes[adapter] = frozenset(chosen)
        return homes
