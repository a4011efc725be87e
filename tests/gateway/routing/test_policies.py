"""Routing policies on hand-built backends: determinism across replicas, bounded load, staleness, LoRA."""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from gateway.fleet.registry import Backend, EngineSample, Registry
from gateway.routing.policies import Affinity, LeastLoad, PerModelPolicy, RoundRobin
from gateway.routing.policy_names import build_policy, make_policy
from gateway.routing.prefix_hash import prefix_key, prompt_prefix
from gateway.routing.request import RequestInfo
from gateway.routing.settings import RoutingSettings

BASE = {"id": "m", "parent": None}


def fleet(n: int = 8, adapters: tuple[str, ...] = ()) -> list[Backend]:
    models: dict[str, dict[str, Any]] = {"m": BASE, **{a: {"id": a, "parent": "m"} for a in adapters}}
    return [Backend(url=f"http://10.0.0.{i}:8000", healthy=True, models=dict(models)) for i in range(n)]


def chat(system: str, question: str, model: str = "m", **extra: Any) -> RequestInfo:
    payload = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    return RequestInfo(model=model, route="/v1/chat/completions", payload={**payload, **extra})


def sample(waiting: float = 0, kv: float = 0, adapters: frozenset[str] = frozenset(), age: float = 0) -> EngineSample:
    return EngineSample(waiting=waiting, running=0, kv_usage=kv, running_adapters=adapters, at=time.monotonic() - age)


SYSTEMS = [f"You are assistant {g}. " + "Be brief and precise. " * 30 for g in range(64)]


def test_two_replicas_choose_the_same_backend_for_the_same_prefix() -> None:
    settings = RoutingSettings()
    one, two = Affinity(settings, random.Random(1)), Affinity(settings, random.Random(2))
    backends_one, backends_two = fleet(), list(reversed(fleet()))  # same fleet, other listing order
    for system in SYSTEMS:
        a = one.pick(backends_one, chat(system, "what time is it?"))
        b = two.pick(backends_two, chat(system, "a different question entirely"))
        assert a.url == b.url
    spread = Counter(one.pick(backends_one, chat(s, "q")).url for s in SYSTEMS)
    assert len(spread) == 8  # 64 prefixes use every backend


def test_prefix_key_uses_leading_whole_blocks() -> None:
    payload = {"messages": [{"role": "system", "content": "x" * 300}, {"role": "user", "content": "hi"}]}
    assert prompt_prefix(payload, 256) == ("system\n" + "x" * 300)[:256]
    longer = {"messages": [*payload["messages"], {"role": "assistant", "content": "more"}]}
    assert prefix_key("m", payload, 256, 64) == prefix_key("m", longer, 256, 64)
    assert prefix_key("m", payload, 256, 64) != prefix_key("other", payload, 256, 64)
    assert prefix_key("m", {"prompt": [1, 2, 3]}, 256, 64) is not None
    assert prefix_key("m", {"prompt": ["abc", "def"]}, 256, 64) == prefix_key("m", {"prompt": "abc"}, 256, 64)
    assert prefix_key("m", None, 256, 64) is None
    assert prefix_key("m", {"input": ""}, 256, 64) is None


def test_bounded_load_leaves_an_overloaded_preferred_backend_the_same_way_on_every_replica() -> None:
    settings = RoutingSettings(load_factor=1.5, load_slack=2, spill_margin=100)
    backends = fleet()
    request = chat(SYSTEMS[0], "q")
    preferred = Affinity(settings).pick(backends, request)
    preferred.inflight = 10  # mean 1.25: limit 1.5 * 1.25 + 2 = 3.9
    picks = {Affinity(settings, random.Random(seed)).pick(backends, request).url for seed in range(5)}
    assert len(picks) == 1
    assert preferred.url not in picks


def test_two_choices_move_a_key_to_its_second_backend_when_the_first_is_busier() -> None:
    settings = RoutingSettings(spill_margin=1, load_slack=100)
    backends = fleet()
    request = chat(SYSTEMS[3], "q")
    policy = Affinity(settings)
    first = policy.pick(backends, request)
    first.inflight = 1
    assert policy.pick(backends, request) is first  # within the margin: stay sticky
    first.inflight = 2
    second = policy.pick(backends, request)
    assert second is not first
    first.inflight = 0
    assert policy.pick(backends, request) is first


def test_queue_threshold_moves_off_a_backend_with_a_long_engine_queue_unless_the_sample_is_stale() -> None:
    settings = RoutingSettings(queue_threshold=4, stale_after=1.0)
    backends = fleet()
    request = chat(SYSTEMS[5], "q")
    policy = Affinity(settings)
    preferred = policy.pick(backends, request)
    preferred.engine = sample(waiting=9)
    assert policy.pick(backends, request) is not preferred
    preferred.engine = sample(waiting=9, age=5.0)  # stale: unknown, not a reason to move
    assert policy.pick(backends, request) is preferred


def test_least_load_treats_stale_or_missing_samples_as_unknown_not_idle() -> None:
    a, b, stale, missing = fleet(4)
    a.engine = sample(waiting=3)
    b.engine = sample(waiting=0, kv=0.1)
    stale.engine = sample(waiting=0, age=10)
    policy = LeastLoad(RoutingSettings(stale_after=1.0), random.Random(0))
    picks = Counter(policy.pick([a, b, stale, missing], chat("s", "q")).url for _ in range(50))
    assert picks == {b.url: 50}


def test_least_load_counts_its_own_inflight_and_breaks_ties_at_random() -> None:
    backends = fleet(4)
    policy = LeastLoad(RoutingSettings(), random.Random(0))
    for _ in range(40):  # a burst before any scrape moves: in-flight counts spread it evenly
        policy.pick(backends, chat("s", "q")).inflight += 1
    assert [b.inflight for b in backends] == [10, 10, 10, 10]


def test_sessions_stick_by_header_or_user() -> None:
    policy = make_policy("session", RoutingSettings())
    backends = fleet()
    by_header = {
        policy.pick(
            backends,
            RequestInfo(
                "m",
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": str(i)}]},
                {"x-session-id": "abc"},
            ),
        ).url
        for i in range(20)
    }
    by_user = {policy.pick(backends, chat(str(i), "q", user="abc")).url for i in range(20)}
    assert len(by_header) == 1
    assert len(by_user) == 1
    spread = {policy.pick(backends, chat("s", "q", user=f"user-{i}")).url for i in range(64)}
    assert len(spread) == 8


def test_lora_adapter_stays_on_a_bounded_set_of_backends() -> None:
    adapters = tuple(f"lora-{i}" for i in range(6))
    backends = fleet(8, adapters)
    policy = Affinity(RoutingSettings(lora_backends=2, load_slack=100), random.Random(0))
    for adapter in adapters:
        used = Counter()
        for i in range(30):
            backend = policy.pick(backends, chat("s", f"q{i}", model=adapter))
            used[backend.url] += 1
            backend.inflight += 1  # load builds up, yet stays within the bound
        assert len(used) == 2, used
        assert min(used.values()) >= 14, used  # both homes share the load
        for backend in backends:
            backend.inflight = 0


def test_lora_adapter_prefers_a_backend_already_running_it() -> None:
    backends = fleet(8, ("lora-a",))
    policy = Affinity(RoutingSettings(lora_backends=1))
    home = policy.pick(backends, chat("s", "q", model="lora-a"))
    elsewhere = next(b for b in backends if b is not home)
    elsewhere.engine = sample(adapters=frozenset({"lora-a"}))
    assert policy.pick(backends, chat("s", "q", model="lora-a")) is elsewhere
    elsewhere.engine = sample(adapters=frozenset({"lora-a"}), waiting=50)  # but not when overloaded
    assert policy.pick(backends, chat("s", "q", model="lora-a")) is home


def test_round_robin_random_and_per_model_dispatch() -> None:
    backends = fleet(3)
    rr = RoundRobin()
    picks = [rr.pick(backends, chat("s", "q")).url for _ in range(6)]
    assert Counter(picks) == {b.url: 2 for b in backends}
    assert picks[:3] == picks[3:]
    policy = build_policy(RoutingSettings(policy="random", models={"m": "round_robin"}))
    assert isinstance(policy, PerModelPolicy)
    assert all(policy.pick(backends, chat("s", "q")) in backends for _ in range(10))


def test_sessions_are_stickier_than_prefixes_under_small_imbalances() -> None:
    # The rendezvous affinity of prefix keys and sessions (the `prefix_affinity` and `session` policies; the
    # default `affinity` is cache-aware since, see test_cache_aware.py).
    settings = RoutingSettings(spill_margin=0, session_spill_margin=2, load_slack=100)
    policy = Affinity(settings)
    backends = fleet()
    by_session = chat("s", "q", user="alice")
    home = policy.pick(backends, by_session)
    home.inflight = 2  # two more than the session's second backend: within the session margin
    assert policy.pick(backends, by_session) is home
    home.inflight = 0
    by_prefix = chat(SYSTEMS[9], "q")
    first = policy.pick(backends, by_prefix)
    first.inflight = 1  # any imbalance moves a prefix key to its second backend
    assert policy.pick(backends, by_prefix) is not first


def sample_with_slots(adapters: frozenset[str], max_lora: int = 2) -> EngineSample:
    return EngineSample(
        waiting=0, running=len(adapters), kv_usage=0, running_adapters=adapters, at=time.monotonic(), max_lora=max_lora
    )


def test_lora_adapter_leaves_a_home_whose_slots_run_other_adapters() -> None:
    backends = fleet(4, ("lora-a", "lora-b", "lora-c"))
    policy = Affinity(RoutingSettings(lora_backends=1))
    for backend in backends:
        backend.engine = sample_with_slots(frozenset())
    home = policy.pick(backends, chat("s", "q", model="lora-a"))
    home.engine = sample_with_slots(frozenset({"lora-b", "lora-c"}))  # both of its slots busy with others
    chosen = policy.pick(backends, chat("s", "q", model="lora-a"))
    assert chosen is not home  # a free slot elsewhere costs a load; a full home costs a wait for a slot
    home.engine = sample_with_slots(frozenset({"lora-b"}))  # one slot free again: home it is
    assert policy.pick(backends, chat("s", "q", model="lora-a")) is home


def test_lora_adapters_the_gateway_keeps_busy_count_before_any_scrape() -> None:
    backends = fleet(4, ("lora-a", "lora-b", "lora-c"))
    policy = Affinity(RoutingSettings(lora_backends=1))
    registry = Registry()
    for backend in backends:
        backend.engine = sample_with_slots(frozenset())  # the last scrape saw every slot free
    home = policy.pick(backends, chat("s", "q", model="lora-a"))
    others = [b for b in backends if b is not home]
    registry.acquire(home, "lora-b")  # this gateway just sent two other adapters there
    registry.acquire(home, "lora-c")
    assert policy.pick(backends, chat("s", "q", model="lora-a")) in others
    elsewhere = others[0]
    registry.acquire(elsewhere, "lora-a")  # and lora-a itself is running elsewhere: join that batch
    assert policy.pick(backends, chat("s", "q", model="lora-a")) is elsewhere
    registry.release(elsewhere, "lora-a")
    registry.release(home, "lora-b")
    assert home.adapters_inflight == {"lora-c": 1}
    assert elsewhere.adapters_inflight == {}
    assert policy.pick(backends, chat("s", "q", model="lora-a")) is home


def test_zipf_adapters_over_slots_spread_without_waits() -> None:
    """16 adapters with Zipf popularity over 8 backends of 2 slots each (what bench/routing.py's lora workload
    runs): placed by the policy with the gateway's own counts, no request goes where every slot runs others
    while a backend with a free slot or the adapter itself is not overloaded."""
    adapters = tuple(f"adapter-{i:02d}" for i in range(16))
    backends = fleet(8, adapters)
    for backend in backends:
        backend.engine = sample_with_slots(frozenset())
    policy = Affinity(RoutingSettings(), random.Random(0))
    registry = Registry()
    rng = random.Random(7)
    running: list[tuple[Backend, str]] = []
    waits = 0
    for step in range(2000):
        adapter = rng.choices(adapters, [1 / (rank + 1) for rank in range(16)])[0]
        backend = policy.pick(backends, chat("s", f"q{step}", model=adapter))
        if adapter not in backend.adapters_inflight and len(backend.adapters_inflight) >= 2:
            waits += 1
        registry.acquire(backend, adapter)
        running.append((backend, adapter))
        if len(running) > 10:  # about ten in flight at once, as at 15 req/s of 0.7 s answers
            done_backend, done_adapter = running.pop(rng.randrange(len(running)))
            registry.release(done_backend, done_adapter)
    assert waits < 2000 * 0.02, waits
