"""What the prefix indexes cost: CPU per request by prompt length, and memory per million cached blocks.

Run (from the repository root, with the venv's Python):

    .venv/bin/python bench/prefix_index.py            # about a minute
    .venv/bin/python bench/prefix_index.py --quick    # a few seconds

It drives the gateway's own code in-process, as a request and as the KV events would: the cache-aware policy's
pick over 8 backends for chat prompts of increasing length, once with only the approximate index (the prompt's
character blocks) and once with the precise one (token ids, as /tokenize returns them; the /tokenize round trip
itself is not included: it is one HTTP call, 6 ms median for a 1,000-token chat on the CPU vLLM worker), and then
the resident memory of the precise index holding N blocks spread over 8 backends (the engines' BlockStored
events applied, as the subscriber applies them), divided per million blocks. It also prints what one pick
costs under each routing policy, for the same short chats.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.fleet.engine_rates import EngineRates  # noqa: E402
from gateway.fleet.kv_protocol import BlockStored  # noqa: E402
from gateway.fleet.registry import Backend, EngineSample  # noqa: E402
from gateway.routing.cache_aware import PrefixCaches  # noqa: E402
from gateway.routing.kv_index import KvIndex  # noqa: E402
from gateway.routing.policy_names import make_policy  # noqa: E402
from gateway.routing.prompt import prompt_view  # noqa: E402
from gateway.routing.request import RequestInfo  # noqa: E402
from gateway.routing.settings import RoutingSettings  # noqa: E402

BLOCK = 16  # tokens per KV block (the simulator's default; vLLM's GPU default)
CHARS_PER_TOKEN = 4


def fleet() -> list[Backend]:
    backends = []
    for i in range(8):
        backend = Backend(url=f"http://10.0.0.{i}:8000", healthy=True, models={"m": {"id": "m", "parent": None}})
        backend.engine = EngineSample(waiting=1, running=4, kv_usage=0.3, at=time.monotonic() + 3600)
        backend.rates = EngineRates(prefill=0.0002, departures=5.0)
        backends.append(backend)
    return backends


def rss() -> int:
    with open(f"/proc/{os.getpid()}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pick_cost(tokens: int, precise: bool, rounds: int) -> float:
    """µs per pick of a chat prompt of `tokens` tokens whose first half is cached on one backend."""
    settings = RoutingSettings(prefix_mode="auto" if precise else "approximate")
    caches = PrefixCaches(settings, KvIndex(10**7))
    policy = make_policy("affinity", settings, random.Random(0), caches)
    backends = fleet()
    rng = random.Random(tokens)
    ids = [rng.randrange(50_000) for _ in range(tokens)]
    text = " ".join(f"w{t % 9973}" for t in ids)[: tokens * CHARS_PER_TOKEN]
    half = len(ids) // 2 // BLOCK * BLOCK
    for backend in backends:
        caches.kv.synced(backend.url, 0)
    caches.kv.apply(backends[3].url, 0, [BlockStored(list(range(half // BLOCK)), None, ids[:half], BLOCK)])
    payload = {"model": "m", "messages": [{"role": "system", "content": text}, {"role": "user", "content": "q"}]}
    started = time.perf_counter()
    for _ in range(rounds):
        view = prompt_view(payload, None)
        assert view is not None
        if precise:
            view.token_ids = ids
        policy.pick(backends, RequestInfo("m", "/v1/chat/completions", payload, prompt=view))
    return (time.perf_counter() - started) / rounds * 1e6


POLICIES = ("affinity", "prefix_affinity", "session", "least_load", "lora_affinity", "round_robin", "random")


def policy_cost(name: str, rounds: int) -> float:
    """µs per pick of each policy over the same 8 backends: 64 system prompts of about 700 characters."""
    settings = RoutingSettings()
    policy = make_policy(name, settings, random.Random(0), PrefixCaches(settings, KvIndex(10**7)))
    backends = fleet()
    systems = [f"You are assistant {g}. " + "Be brief and precise. " * 30 for g in range(64)]
    requests = []
    for i in range(200):
        messages = [{"role": "system", "content": systems[i % 64]}, {"role": "user", "content": f"question {i}"}]
        payload = {"model": "m", "messages": messages}
        requests.append(RequestInfo("m", "/v1/chat/completions", payload, size=len(str(payload))))
    started = time.perf_counter()
    for _ in range(rounds):
        for request in requests:
            policy.pick(backends, request)
    return (time.perf_counter() - started) / (rounds * len(requests)) * 1e6


def memory_per_million(blocks: int) -> float:
    """Bytes of resident memory per million indexed blocks, for `blocks` blocks over 8 backends."""
    gc.collect()
    before = rss()
    index = KvIndex(10**8)
    rng = random.Random(1)
    per_backend = blocks // 8
    for backend in range(8):
        url = f"http://10.0.0.{backend}:8000"
        index.synced(url, 0)
        engine_hash = backend << 40
        for _ in range(per_backend // 64):  # prompts of 64 blocks each, as BlockStored batches
            ids = [rng.randrange(50_000) for _ in range(64 * BLOCK)]
            hashes = list(range(engine_hash, engine_hash + 64))
            engine_hash += 64
            index.apply(url, 0, [BlockStored(hashes, None, ids, BLOCK)])
    gc.collect()
    used = rss() - before
    held = sum(entry.blocks for entry in index.snapshot())
    return used / held * 1_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 200 if args.quick else 2000
    lengths = (64, 512, 1000, 4000, 16000)
    print("CPU of one cache-aware pick over 8 backends (chat prompt, half of it cached on one backend), µs")
    print(f"{'prompt tokens':>14} {'approximate':>12} {'precise':>9} {'precise per 1,000 tokens':>25}")
    for tokens in lengths:
        approximate = pick_cost(tokens, False, max(rounds * 64 // tokens, 20))
        precise = pick_cost(tokens, True, max(rounds * 64 // tokens, 20))
        print(f"{tokens:>14} {approximate:>12.1f} {precise:>9.1f} {precise / tokens * 1000:>25.1f}")
    print()
    print("CPU of one pick over 8 backends by policy (chat prompts of about 700 characters, 64 system prompts), µs")
    for name in POLICIES:
        print(f"{name:>16} {policy_cost(name, 2 if args.quick else 20):>8.1f}")
    blocks = 200_000 if args.quick else 1_000_000
    per_million = memory_per_million(blocks)
    print()
    print(f"precise index: {per_million / 2**20:.0f} MiB of resident memory per million cached blocks "
          f"(measured with {blocks:,} blocks over 8 backends)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
