"""The default policy on hand-built backends: cached tokens against queues, both indexes, ties, spread."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from gateway.fleet.engine_rates import EngineRates
from gateway.fleet.kv_protocol import BlockStored
from gateway.fleet.registry import Backend, EngineSample
from gateway.routing.cache_aware import PrefixCaches
from gateway.routing.kv_index import KvIndex
from gateway.routing.policy_names import make_policy
from gateway.routing.prompt import prompt_view
from gateway.routing.request import RequestInfo
from gateway.routing.settings import RoutingSettings

BS = 16


def fleet(n: int = 4, waiting: float = 0.0, prefill: float = 0.001, departures: float = 2.0) -> list[Backend]:
    backends = []
    for i in range(n):
        backend = Backend(url=f"http://10.0.0.{i}:8000", healthy=True, models={"m": {"id": "m", "parent": None}})
        backend.engine = EngineSample(waiting=waiting, running=1, kv_usage=0.1, at=time.monotonic())
        backend.rates = EngineRates(prefill=prefill, departures=departures)
        backends.append(backend)
    return backends


def policy(caches: PrefixCaches | None = None, **settings: Any) -> Any:
    routing = RoutingSettings(**settings)
    return make_policy("affinity", routing, random.Random(0), caches or PrefixCaches(routing, KvIndex(10**6)))


def with_tokens(ids: list[int]) -> RequestInfo:
    payload = {"model": "m", "prompt": ids}
    view = prompt_view(payload, None)
    assert view is not None
    assert view.token_ids == ids
    return RequestInfo("m", "/v1/completions", payload, prompt=view)


def chat(messages: list[dict[str, str]]) -> RequestInfo:
    return RequestInfo("m", "/v1/chat/completions", {"model": "m", "messages": messages})


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def store(index: KvIndex, url: str, ids: list[int], first_hash: int) -> None:
    blocks = len(ids) // BS
    index.synced(url, 0)
    index.apply(url, 0, [BlockStored(list(range(first_hash, first_hash + blocks)), None, ids[: blocks * BS], BS)])


def spread(pick: Any, backends: list[Backend], requests: Iterable[RequestInfo], in_flight: int) -> Counter[str]:
    """Requests picked one after another with about `in_flight` of them open at any time: picks per backend."""
    counts: Counter[str] = Counter()
    open_requests: list[Backend] = []
    for request in requests:
        chosen = pick.pick(backends, request)
        chosen.inflight += 1
        open_requests.append(chosen)
        counts[chosen.url] += 1
        if len(open_requests) > in_flight:
            open_requests.pop(0).inflight -= 1
    return counts


def test_the_backend_holding_the_prompt_wins_until_its_queue_costs_more_than_the_prefill_saved() -> None:
    backends = fleet()
    routing = RoutingSettings()
    caches = PrefixCaches(routing, KvIndex(10**6))
    pick = policy(caches)
    prompt = tokens(64 * BS, seed=1)  # 1,024 tokens: about 1 s of prefill at 1 ms a token
    holder = backends[2]
    store(caches.kv, holder.url, prompt, 100)
    for other in backends:
        if other is not holder:
            caches.kv.synced(other.url, 0)
    request = with_tokens(prompt)
    assert pick.pick(backends, request) is holder
    assert request.prompt is not None
    assert request.prompt.predicted[holder.url] == 1008  # 63 blocks: the engine always computes the last token
    assert request.prompt.predicted[backends[0].url] == 0
    assert holder.engine is not None
    holder.engine = EngineSample(waiting=4, running=1, kv_usage=0.5, at=time.monotonic())  # 2 s of queue
    assert pick.pick(backends, with_tokens(prompt)) is not holder


def test_a_conversations_next_turn_follows_its_history_on_the_approximate_index() -> None:
    backends = fleet()
    pick = policy(prefix_mode="approximate")
    system = {"role": "system", "content": "You are a patient tutor. " * 40}
    homes: dict[int, Backend] = {}
    for turn in range(4):
        for conversation in range(6):
            history: list[dict[str, str]] = [system]
            for earlier in range(turn + 1):
                history.append({"role": "user", "content": f"conversation {conversation} question {earlier} " * 8})
                if earlier < turn:
                    history.append({"role": "assistant", "content": f"answer {conversation}.{earlier} " * 20})
            chosen = pick.pick(backends, chat(history))
            homes.setdefault(conversation, chosen)
            assert chosen is homes[conversation], f"conversation {conversation} moved at turn {turn}"


def test_unique_prompts_spread_evenly_under_load() -> None:
    backends = fleet(8)
    pick = policy()
    requests = (chat([{"role": "user", "content": f"unique prompt number {i} " * 30}]) for i in range(800))
    counts = spread(pick, backends, requests, in_flight=24)
    assert max(counts.values()) <= 1.25 * 800 / 8, counts


def test_an_engine_rebuilding_its_index_counts_what_is_known_or_guessed_whichever_is_more() -> None:
    backends = fleet(2)
    routing = RoutingSettings()
    caches = PrefixCaches(routing, KvIndex(10**6))
    pick = policy(caches)
    prompt = tokens(32 * BS, seed=4)
    first = with_tokens(prompt)
    chosen = pick.pick(backends, first)  # the approximate index records where it went
    for backend in backends:
        store(caches.kv, backend.url, prompt[: 4 * BS], 1000 + 100 * backends.index(backend))
    caches.kv.lost(chosen.url)  # its events were lost: the gateway's own guess stands in
    again = with_tokens(prompt)
    assert pick.pick(backends, again) is chosen
    assert again.prompt is not None
    other = next(b for b in backends if b is not chosen)
    assert again.prompt.predicted[other.url] == 4 * BS  # live: exactly what its events show
    assert again.prompt.predicted[chosen.url] > 4 * BS  # rebuilding: its guess, which is more


def test_a_stale_engine_sample_counts_as_the_longest_queue_not_as_idle() -> None:
    backends = fleet(2, waiting=0)
    stale, fresh = backends
    stale.engine = EngineSample(waiting=0, running=0, kv_usage=0.0, at=time.monotonic() - 60)
    fresh.engine = EngineSample(waiting=3, running=1, kv_usage=0.5, at=time.monotonic())
    pick = policy()
    prompt = chat([{"role": "user", "content": "x" * 400}])
    # Both cost the same queue: the tie goes by rendezvous, the same on every call, never to the stale one
    # for being "idle". A long enough prompt held by the fresh one settles it.
    results = {pick.pick(backends, prompt).url for _ in range(5)}
    assert len(results) == 1


def test_two_replicas_fed_the_same_events_make_the_same_choices() -> None:
    settings = RoutingSettings()
    replicas = [PrefixCaches(settings, KvIndex(10**6)) for _ in range(2)]
    backends = [fleet(6) for _ in range(2)]  # each replica's own view of the same fleet
    systems = [tokens(24 * BS, seed=100 + g) for g in range(12)]
    for caches, view in zip(replicas, backends, strict=True):
        for g, system in enumerate(systems[:6]):
            store(caches.kv, view[g % 6].url, system, 10_000 * (g + 1))
    picks = [policy(caches) for caches in replicas]
    for g, system in enumerate(systems):
        prompt = [*system, *tokens(40, seed=g)]
        one = picks[0].pick(backends[0], with_tokens(prompt)).url
        two = picks[1].pick(list(reversed(backends[1])), with_tokens(prompt)).url  # other listing order
        assert one == two


def test_unique_prompts_after_a_system_prompt_every_backend_holds_spread_evenly() -> None:
    """The adversarial case of a shared system prompt: it is cached everywhere, so it must not decide ties
    (were it the tie-break's anchor, every request would prefer the same backend among the least busy)."""
    backends = fleet(8)
    caches = PrefixCaches(RoutingSettings(), KvIndex(10**6))
    system = tokens(8 * BS, seed=7)
    for number, backend in enumerate(backends):
        store(caches.kv, backend.url, system, 1_000 * (number + 1))
    pick = policy(caches)
    requests = (with_tokens([*system, *tokens(10 * BS, seed=10_000 + i)]) for i in range(800))
    counts = spread(pick, backends, requests, in_flight=24)
    assert max(counts.values()) <= 1.25 * 800 / 8, counts


def test_chats_after_a_shared_system_message_spread_evenly_on_the_approximate_index() -> None:
    backends = fleet(8)
    pick = policy()
    system = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 6}
    for backend in backends:  # each has served the system message once: the approximate index knows it
        chosen = pick.pick([backend], chat([system, {"role": "user", "content": "warm up " * 40}]))
        assert chosen is backend
    requests = (
        chat([system, {"role": "user", "content": f"question {i}: {random.Random(i).random()} " * 20}])
        for i in range(800)
    )
    counts = spread(pick, backends, requests, in_flight=24)
    assert max(counts.values()) <= 1.25 * 800 / 8, counts


def test_unique_prompts_spread_evenly_over_engines_whose_measured_speeds_differ_by_noise() -> None:
    """Identical engines never measure identical prefill rates: a few percent of noise must not make the one
    that happened to measure fastest take every request while the fleet is lightly loaded."""
    backends = fleet(8)
    jitter = random.Random(3)
    for backend in backends:
        backend.rates = EngineRates(prefill=0.00015 * jitter.uniform(0.9, 1.1), departures=2.0)
    pick = policy()
    requests = (with_tokens(tokens(20 * BS, seed=20_000 + i)) for i in range(800))
    counts = spread(pick, backends, requests, in_flight=4)  # a light load: most backends idle at any time
    assert max(counts.values()) <= 1.25 * 800 / 8, counts


def test_first_measurements_apart_by_chance_do_not_make_a_favourite_at_light_load() -> None:
    """An engine's first windows measure its prefill 20% off by chance: one backend measured that much faster
    on little evidence must not take every unique prompt its bounded load allows while the others idle."""
    backends = fleet(8)
    for number, backend in enumerate(backends):
        fast = number == 3
        backend.rates = EngineRates(prefill=0.00012 if fast else 0.00015, departures=2.0, prefill_tokens=2_000)
    pick = policy()
    requests = (with_tokens(tokens(20 * BS, seed=30_000 + i)) for i in range(800))
    counts = spread(pick, backends, requests, in_flight=3)
    assert max(counts.values()) <= 1.25 * 800 / 8, counts


def test_an_engine_shown_slower_on_plenty_of_evidence_gets_fewer_requests() -> None:
    """Shrinking toward the fleet's mean must not hide a truly slower engine (an older GPU) for long."""
    backends = fleet(4)
    for number, backend in enumerate(backends):
        slow = number == 0
        backend.rates = EngineRates(prefill=0.0006 if slow else 0.0002, departures=2.0, prefill_tokens=500_000)
    pick = policy()
    requests = (with_tokens(tokens(20 * BS, seed=40_000 + i)) for i in range(400))
    counts = spread(pick, backends, requests, in_flight=2)
    assert counts[backends[0].url] < min(counts[b.url] for b in backends[1:]) / 2, counts


def live_fleet(caches: PrefixCaches, n: int = 4) -> list[Backend]:
    """Backends whose engines have announced some unrelated blocks: live, with their block size known."""
    backends = fleet(n)
    for number, backend in enumerate(backends):
        store(caches.kv, backend.url, tokens(2 * BS, seed=900 + number), 50_000 * (number + 1))
    return backends


def routed_like_the_router(pick: Any, backends: list[Backend], request: RequestInfo) -> Backend:
    """A pick counted as the Router counts it: in flight, with its uncached prompt tokens pending prefill."""
    chosen: Backend = pick.pick(backends, request)
    view = request.prompt
    assert view is not None
    assert view.token_ids is not None
    chosen.inflight += 1
    chosen.prefill_pending += max(len(view.token_ids) - int(view.predicted[chosen.url]), 0)
    return chosen


def test_a_burst_for_a_prefix_nobody_holds_yet_stays_on_one_backend_before_its_blocks_are_announced() -> None:
    """The engine announces a prompt's blocks only after its prefill: the requests that follow the first one
    within that window must find it on its way there, not be spread (each computing it again, evicting others)."""
    caches = PrefixCaches(RoutingSettings(), KvIndex(10**6))
    backends = live_fleet(caches)
    pick = policy(caches)
    system = tokens(64 * BS, seed=5)
    chosen = [routed_like_the_router(pick, backends, with_tokens([*system, *tokens(8, seed=i)])) for i in range(4)]
    assert len({backend.url for backend in chosen}) == 1, [backend.url for backend in chosen]
    later = with_tokens([*system, *tokens(8, seed=99)])
    pick.pick(backends, later)
    assert later.prompt is not None
    assert later.prompt.predicted[chosen[0].url] == 64 * BS  # predicted cached there: on its way


def test_a_near_whole_hit_behind_another_prefill_beats_a_miss_on_an_idle_backend() -> None:
    """The holder's pending prefill makes both predicted TTFTs about equal; the miss would cost a whole prefill
    more (and evict other prefixes), so the tie goes to the holder rather than to the idler backend."""
    caches = PrefixCaches(RoutingSettings(), KvIndex(10**6))
    backends = live_fleet(caches)
    prompt = tokens(64 * BS, seed=6)
    holder = backends[1]
    store(caches.kv, holder.url, prompt, 7_000)
    holder.inflight = 1
    holder.prefill_pending = 64 * BS  # another request's cold prefill, still running there
    assert policy(caches).pick(backends, with_tokens([*prompt, *tokens(8, seed=1)])) is holder
