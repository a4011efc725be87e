"""LoRA adapters' home backends: spread evenly, the same on every replica whatever the listing order, only on
backends that serve the adapter, and rebalanced when the fleet changes."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from gateway.fleet.registry import Backend
from gateway.routing.adapter_homes import AdapterHomes
from gateway.routing.policies import Affinity
from gateway.routing.prefix_hash import name_key
from gateway.routing.settings import RoutingSettings

ADAPTERS = tuple(f"adapter-{i:02d}" for i in range(16))


def fleet(n: int, adapters: tuple[str, ...] = ADAPTERS) -> list[Backend]:
    models: dict[str, Any] = {"m": {"id": "m", "parent": None}, **{a: {"id": a, "parent": "m"} for a in adapters}}
    return [Backend(url=f"http://10.0.1.{i}:8000", healthy=True, models=dict(models)) for i in range(n)]


def homes(per_adapter: int, backends: list[Backend], seed: int = 0) -> dict[str, frozenset[str]]:
    policy = Affinity(RoutingSettings(lora_backends=per_adapter), random.Random(seed))
    placement = AdapterHomes(per_adapter, policy._ranked)
    return {adapter: placement.of(backends, adapter) for adapter in ADAPTERS}


def test_every_backend_is_home_to_its_share_and_no_more() -> None:
    for per_adapter, backends, share in ((1, 8, 2), (2, 8, 4), (1, 5, 4), (3, 4, 12)):
        placed = homes(per_adapter, fleet(backends))
        assert all(len(urls) == per_adapter for urls in placed.values())
        load = Counter(url for urls in placed.values() for url in urls)
        assert len(load) == backends
        assert max(load.values()) <= share, (per_adapter, backends, load)
    ranked = Affinity(RoutingSettings(), random.Random(0))._ranked
    plain = Counter(ranked(fleet(8), name_key(adapter))[0].url for adapter in ADAPTERS)  # rendezvous alone
    assert max(plain.values()) > 2


def test_replicas_agree_whatever_order_they_list_the_fleet_in() -> None:
    backends = fleet(8)
    shuffled = list(backends)
    random.Random(3).shuffle(shuffled)
    assert homes(1, backends, seed=1) == homes(1, shuffled, seed=2)


def test_only_backends_serving_the_adapter_are_its_homes() -> None:
    backends = fleet(4)
    del backends[0].models["adapter-03"]
    del backends[1].models["adapter-03"]
    placed = homes(2, backends)
    assert placed["adapter-03"] <= {backends[2].url, backends[3].url}
    assert placed["adapter-03"]


def test_a_backend_that_leaves_gives_its_adapters_new_homes() -> None:
    backends = fleet(8)
    before = homes(1, backends)
    gone = backends.pop(5)
    after = homes(1, backends)
    moved = {adapter for adapter in ADAPTERS if before[adapter] != after[adapter]}
    assert {adapter for adapter, urls in before.items() if gone.url in urls} <= moved
    assert all(gone.url not in urls for urls in after.values())
    assert len(moved) < len(ADAPTERS)  # the others mostly stay where they are loaded
