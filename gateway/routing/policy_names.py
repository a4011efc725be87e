"""What each `routing.policy` name means: the policy classes behind the names, per model."""

from __future__ import annotations

import random

from gateway.routing.cache_aware import CacheAware, PrefixCaches
from gateway.routing.cost_model import CostModel
from gateway.routing.kv_index import KvIndex
from gateway.routing.policies import Affinity, LeastInflight, LeastLoad, PerModelPolicy, Policy, RandomPick, RoundRobin
from gateway.routing.settings import PolicyName, RoutingSettings


def make_policy(
    name: PolicyName, settings: RoutingSettings, rng: random.Random | None = None, caches: PrefixCaches | None = None
) -> Policy:
    if name == "affinity":
        if caches is None:  # a policy of its own, with empty indexes (tests, tools)
            caches = PrefixCaches(settings, KvIndex(1_000_000))
        cost = CostModel(settings.prior_prefill_seconds_per_token)
        return CacheAware(settings, caches, cost, Affinity(settings, rng, prefixes=False, sessions=True))
    if name == "prefix_affinity":
        return Affinity(settings, rng, sessions=False, adapters=False)
    if name == "session":
        return Affinity(settings, rng, prefixes=False, adapters=False)
    if name == "lora_affinity":
        return Affinity(settings, rng, prefixes=False, sessions=False)
    if name == "least_load":
        return LeastLoad(settings, rng)
    if name == "least_inflight":
        return LeastInflight(rng)
    if name == "round_robin":
        return RoundRobin()
    return RandomPick(rng)


def build_policy(
    settings: RoutingSettings, rng: random.Random | None = None, caches: PrefixCaches | None = None
) -> Policy:
    default = make_policy(settings.policy, settings, rng, caches)
    if not settings.models:
        return default
    by_model = {model: make_policy(name, settings, rng, caches) for model, name in settings.models.items()}
    return PerModelPolicy(default, by_model)


def uses_prefix_caches(settings: RoutingSettings, model: str) -> bool:
    """Whether requests for `model` are routed by the prefix indexes (so preparing their prompt pays)."""
    return settings.models.get(model, settings.policy) == "affinity"
