"""Routing benchmark: Switchyard's policies against a plain Kubernetes Service (random backend) and
vllm-router's cache_aware, on one fleet of simulated vLLM servers, at increasing Poisson rates.

Run (from the repository root, with the venv's Python):

    .venv/bin/python bench/routing.py            # every workload and row (~13 minutes on 2 cores)
    .venv/bin/python bench/routing.py --quick    # 3 rows, 5 rates, 5 s each (~3 minutes)
    .venv/bin/python bench/routing.py --workloads lora --systems "direct random,gw affinity" \
        --rates 15,25 --set routing.lora_backends=2     # any subset, with gateway settings overridden

Fleet: 8 simulated servers of one model in one process (`python -m worker.sim --count 8`), restarted
for every row so no row inherits another's prefix cache; each row runs its rates in ascending order.
Rows: `direct random` (the client picks a random server per request, as a Service does), each policy
through the gateway (a `python -m gateway` process), and `vllm-router cache_aware` when its binary is
found (`--vllm-router`, default /tmp/vr-venv/bin/vllm-router; install it with
`python -m venv /tmp/vr-venv && /tmp/vr-venv/bin/pip install vllm-router==0.1.17`).

Workloads (streamed chat completions):
- shared_prefix: 32 groups, each with a ~1,500-token system prompt, and a short unique question;
- sessions: multi-turn conversations sharing one short system prompt; each turn resends the
  history (`user` is the session id), so the previous turn's prompt is a cached prefix where it ran;
- unique: unique prompts with no shared prefix (the hot-spot check);
- lora: unique prompts to 16 adapters with Zipf popularity; each server runs 2 adapters at a time.

The simulator's KV pool is small on purpose (800 blocks of 16 tokens: about 8 of the 32 group
prompts), so a server that sees every group keeps evicting them, as a real GPU would under load.

Columns: offered rate, achieved requests/s (completed / time from first send to last answer), TTFT
p50/p90/p99 and e2e p99 (client-side), prefix-cache hit rate (prefix_cache_hits / queries from the
servers' own metrics, over the run), 429 answers, other failures, and the largest share of requests
one server took relative to a fair share (1.00 = perfectly even).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Request, Result, run  # noqa: E402
from tests.servers import wait_until  # noqa: E402
from worker.sim.text import render_chat, tokenize  # noqa: E402

MODEL = "bench"
SERVERS = 8
ADAPTERS = [f"adapter-{i:02d}" for i in range(16)]
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform")  # fmt: skip
SIM_TIMING = ["--decode-ms-per-token", "10", "--prefill-ms-per-token", "0.15", "--num-gpu-blocks", "1000"]
DEFAULT_ROW = "gw affinity"  # the default policy; with the simulators' KV events: the precise mode
APPROXIMATE_ROW = "gw affinity approximate"  # the same policy from the gateway's own record only
KV_EVENTS = (
    '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:@PUB@", '
    '"replay_endpoint": "tcp://*:@REPLAY@"}'
)  # fmt: skip  (a wildcard host binds, as vLLM's)


def text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def chat(model: str, messages: list[dict[str, str]], max_tokens: int, **extra: str) -> dict[str, object]:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            **extra}  # fmt: skip


# -- workloads ----------------------------------------------------------------------------------------


class Workload:
    name = ""
    servers = SERVERS
    sim_args: list[str] = []

    def make(self, rng: random.Random) -> Request:
        raise NotImplementedError


class SharedPrefix(Workload):
    name = "shared_prefix"

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.systems = [f"You are assistant number {g}. " + text(rng, 6000) for g in range(32)]
        self.counter = 0

    def make(self, rng: random.Random) -> Request:
        self.counter += 1
        system = rng.choice(self.systems)
        question = f"Question {self.counter}: " + text(rng, 120)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return Request("/v1/chat/completions", chat(MODEL, messages, 16))


class Sessions(Workload):
    name = "sessions"
    turns = 8

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.system = "You are a helpful assistant for a travel agency. " + text(rng, 400)
        self.idle: list[tuple[str, list[dict[str, str]]]] = []
        self.sessions = 0

    def make(self, rng: random.Random) -> Request:
        if self.idle and (len(self.idle) > 8 or rng.random() < 0.9):
            session, history = self.idle.pop(rng.randrange(len(self.idle)))
        else:
            self.sessions += 1
            session, history = f"session-{self.sessions}", [{"role": "system", "content": self.system}]
        history = [*history, {"role": "user", "content": text(rng, 200)}]
        body = chat(MODEL, history, 16, user=session)

        def done(_: str) -> None:
            answer = {"role": "assistant", "content": text(random.Random(len(history)), 300)}
            if len(history) < 2 * self.turns:
                self.idle.append((session, [*history, answer]))

        return Request("/v1/chat/completions", body, on_done=done)


class Unique(Workload):
    name = "unique"

    def __init__(self, seed: int) -> None:
        self.counter = 0

    def make(self, rng: random.Random) -> Request:
        self.counter += 1
        content = f"{self.counter} {rng.random()} " + text(rng, 1200)
        return Request("/v1/chat/completions", chat(MODEL, [{"role": "user", "content": content}], 16))


class LoraMix(Workload):
    name = "lora"
    sim_args = [arg for name in ADAPTERS for arg in ("--lora", name)] + [
        "--max-loras",
        "2",
        "--lora-load-ms",
        "100",
        "--decode-ms-per-token",
        "20",
    ]

    def __init__(self, seed: int) -> None:
        self.weights = [1.0 / (rank + 1) for rank in range(len(ADAPTERS))]  # Zipf, s = 1
        self.counter = 0

    def make(self, rng: random.Random) -> Request:
        self.counter += 1
        adapter = rng.choices(ADAPTERS, self.weights)[0]
        content = f"{self.counter} {rng.random()} " + text(rng, 600)
        return Request("/v1/chat/completions", chat(adapter, [{"role": "user", "content": content}], 32))


TIGHT_FLEET = 4  # the new workloads' fleet: 4 servers with a tight KV cache


class TightGroups(Workload):
    """Shared-prefix groups on caches too small for them: each server holds fewer than twice its share of the
    groups (24 groups of ~1,000 tokens on 4 servers of 640 blocks of 16 tokens: about 10 groups each)."""

    name = "tight_groups"
    servers = TIGHT_FLEET
    sim_args = ["--num-gpu-blocks", "640", "--max-model-len", "4096"]

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.systems = [f"You are agent {g} of the support desk. " + text(rng, 4000) for g in range(24)]
        self.counter = 0

    def make(self, rng: random.Random) -> Request:
        self.counter += 1
        system = rng.choice(self.systems)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Ticket {self.counter}: "
                                                                                        + text(rng, 120)}]  # fmt: skip
        return Request("/v1/chat/completions", chat(MODEL, messages, 16))


class SharedSystemChats(Workload):
    """Multi-turn chats that all share one long system prompt, resend their history with the answers they
    really got, and name no `user` and no session: what most clients send."""

    name = "chats"
    servers = TIGHT_FLEET
    sim_args = ["--num-gpu-blocks", "1200", "--max-model-len", "4096"]
    turns = 6

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.system = "You are the assistant of an online bookshop. Policies: " + text(rng, 6000)
        self.idle: list[list[dict[str, str]]] = []

    def make(self, rng: random.Random) -> Request:
        if self.idle and (len(self.idle) > 48 or rng.random() < 0.85):
            history = self.idle.pop(rng.randrange(len(self.idle)))
        else:
            history = [{"role": "system", "content": self.system}]
        history = [*history, {"role": "user", "content": text(rng, 200)}]

        def done(answer: str) -> None:
            if len(history) < 2 * self.turns and answer:
                self.idle.append([*history, {"role": "assistant", "content": answer}])

        return Request("/v1/chat/completions", chat(MODEL, history, 48), on_done=done)


class Mixed(Workload):
    """Tight groups, shared-system chats and unique prompts, a third each, on one fleet."""

    name = "mixed"
    servers = TIGHT_FLEET
    sim_args = ["--num-gpu-blocks", "1000", "--max-model-len", "4096"]

    def __init__(self, seed: int) -> None:
        self.parts: list[Workload] = [TightGroups(seed), SharedSystemChats(seed + 1), Unique(seed + 2)]

    def make(self, rng: random.Random) -> Request:
        return rng.choice(self.parts).make(rng)


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "shared_prefix": SharedPrefix,
    "sessions": Sessions,
    "unique": Unique,
    "lora": LoraMix,
    "tight_groups": TightGroups,
    "chats": SharedSystemChats,
    "mixed": Mixed,
}


# -- processes ----------------------------------------------------------------------------------------


def port_block(count: int) -> int:
    """A base port below the ephemeral range whose `count` ports can all be bound right now (ports in
    the ephemeral range may be taken by some client connection between our check and the bind)."""
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free ports")


@contextlib.contextmanager
def process(argv: list[str], ready_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or None
    )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            return httpx.get(ready_url, timeout=1).status_code == 200

        wait_until(up, 60, 0.1, what=ready_url)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@contextlib.contextmanager
def fleet(workload: Workload) -> Iterator[list[str]]:
    servers = workload.servers
    base = port_block(servers)
    events = port_block(2 * servers)  # server i publishes on events + 2i, replays on events + 2i + 1 (--count)
    kv = KV_EVENTS.replace("@PUB@", str(events)).replace("@REPLAY@", str(events + 1))
    argv = [sys.executable, "-m", "worker.sim", "--served-model-name", MODEL, "--host", "127.0.0.1",
            "--count", str(servers), "--port-base", str(base), *SIM_TIMING, *workload.sim_args,
            "--enable-prefix-caching", "--kv-events-config", kv, "--enable-prompt-tokens-details"]  # fmt: skip
    urls = [f"http://127.0.0.1:{base + i}" for i in range(servers)]
    with process(argv, urls[-1] + "/health"):
        wait_until(lambda: all(httpx.get(u + "/health").status_code == 200 for u in urls), 30, what="fleet")
        yield urls


@contextlib.contextmanager
def gateway(urls: list[str], policy: str, overrides: list[str]) -> Iterator[str]:
    port = port_block(1)
    policy, _, mode = policy.partition(" ")  # "affinity approximate": the policy and its prefix mode
    config: dict[str, Any] = {
        "backends": [{"url": url} for url in urls],
        "routing": {"policy": policy, **({"prefix_mode": mode} if mode else {})},
        "model_refresh_interval": 2.0,
        "access_log": False,
        "log_level": "warning",
    }
    for item in overrides:  # --set routing.load_factor=2 (YAML values)
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "gateway", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("SWITCHYARD_")}
        with process(argv, f"http://127.0.0.1:{port}/ready", env):
            yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def vllm_router(binary: str, urls: list[str]) -> Iterator[str]:
    port = port_block(1)
    argv = [binary, "--worker-urls", *urls, "--policy", "cache_aware", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    with process(argv, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


# -- measuring ----------------------------------------------------------------------------------------


def counters(urls: list[str]) -> list[dict[str, float]]:
    wanted = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total")
    out = []
    for url in urls:
        values = dict.fromkeys(wanted, 0.0)
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            name = line.split("{", 1)[0]
            if name in values:
                values[name] += float(line.rsplit(" ", 1)[1])
        out.append(values)
    return out


@dataclass
class Row:
    workload: str
    system: str
    rate: float
    results: list[Result]
    wall: float
    hit_rate: float
    max_share: float
    cold_share: float  # requests that had under half of their prompt sent before in this run
    floor_p90: float = float("nan")  # OracleFloor: no router's TTFT p90 can be lower

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    def ttft(self, q: float) -> float:
        values = sorted((r.first or 0.0) - r.sent for r in self.ok)
        return quantile(values, q)

    def e2e(self, q: float) -> float:
        return quantile(sorted((r.done or 0.0) - r.sent for r in self.ok), q)

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.wall if self.wall else 0.0

    @property
    def rejected(self) -> int:
        return sum(1 for r in self.results if r.status == 429)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok and r.status != 429)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


class ColdCounter:
    """How many prompts had under half of their 256-character blocks (chained, from the start) sent before.

    When more than a tenth of a row's requests are that cold, its TTFT p90 includes a mostly uncached
    prefill whatever the router does: the goals print this share beside a missed TTFT ratio."""

    BLOCK = 256

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.cold = 0
        self.total = 0

    def count(self, body: dict[str, object]) -> None:
        messages = body.get("messages")
        prompt = (
            "".join(str(m.get("content", "")) for m in messages)
            if isinstance(messages, list)
            else str(body.get("prompt", ""))
        )
        keys, key = [], hash(str(body.get("model")))
        for start in range(0, len(prompt), self.BLOCK):
            key = hash((key, prompt[start : start + self.BLOCK]))
            keys.append(key)
        held = next((i for i, k in enumerate(keys) if k not in self.seen), len(keys))
        self.seen.update(keys)
        self.total += 1
        self.cold += held * 2 < len(keys)

    @property
    def share(self) -> float:
        return self.cold / self.total if self.total else 0.0


class OracleFloor:
    """The time to first token no router can beat, request by request: the simulator's own prompt tokens (its
    chat template and tokenizer), every block of them that any earlier request of the run sent counted as
    cached, and the rest prefilled in chunked steps on an idle engine (its step formula: a decode step's time
    plus the prefill time per token). It flatters every router (infinitely many idle engines that hold all
    prefixes); when even its p90 is above half of random's, no policy can get to half. A chat's answer counts as
    cached with its prompt (the engine keeps both), so the next turn's history is cached up to the new message."""

    def __init__(self, sim_args: list[str]) -> None:
        options = dict(zip(sim_args[::2], sim_args[1::2], strict=False))  # later flags win, as for argparse
        self.prefill_ms = float(options.get("--prefill-ms-per-token", 0.15))
        self.decode_ms = float(options.get("--decode-ms-per-token", 15.0))
        self.budget = int(options.get("--max-num-batched-tokens", 2048))
        self.block = int(options.get("--block-size", 16))
        self.seen: set[int] = set()
        self.floors: list[float] = []

    def count(self, request: Request) -> None:
        body = request.body
        messages = body.get("messages")
        if isinstance(messages, list):
            turns = [(str(m.get("role")), str(m.get("content", ""))) for m in messages]
            text = render_chat(turns)
            if request.on_done is not None:  # the answer joins the cache: learn it when it comes
                request.on_done = self._learning_answer(request.on_done, turns, str(body.get("model")))
        else:
            text = str(body.get("prompt", ""))
        tokens = tokenize(text)
        uncached = max(len(tokens) - self._learn(tokens, str(body.get("model"))), 1)  # the last one is computed
        steps = -(-uncached // self.budget)
        self.floors.append((steps * self.decode_ms + uncached * self.prefill_ms) / 1000)

    def _learn(self, tokens: list[int], model: str) -> int:
        """Remember the blocks of `tokens`; returns how many of its leading tokens were known before."""
        key = hash(model)
        cached = 0
        fresh = True
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = hash((key, *tokens[start : start + self.block]))
            if fresh and key in self.seen:
                cached = start + self.block
            else:
                fresh = False
            self.seen.add(key)
        return cached

    def _learning_answer(
        self, done: Callable[[str], None], turns: list[tuple[str, str]], model: str
    ) -> Callable[[str], None]:
        def learn_then(answer: str) -> None:
            self._learn(tokenize(render_chat([*turns, ("assistant", answer)], add_generation_prompt=False)), model)
            done(answer)

        return learn_then

    def p90(self) -> float:
        return quantile(sorted(self.floors), 0.9)


def measure(workload: Workload, system: str, urls: list[str], target: str | None, rate: float, duration: float,
            seed: int) -> Row:  # fmt: skip
    before = counters(urls)
    pick = None if target is not None else (lambda rng, options: rng.choice(options))
    cold = ColdCounter()
    floor = OracleFloor([*SIM_TIMING, *workload.sim_args])

    def make(rng: random.Random) -> Request:
        request = workload.make(rng)
        cold.count(request.body)
        floor.count(request)
        return request

    results, wall = asyncio.run(run([target] if target else urls, make, rate, duration, seed, pick))
    after = counters(urls)
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    queries = sum(d["vllm:prefix_cache_queries_total"] for d in delta)
    hits = sum(d["vllm:prefix_cache_hits_total"] for d in delta)
    served = [d["vllm:request_success_total"] for d in delta]
    share = max(served) / (sum(served) / len(served)) if sum(served) else float("nan")
    hit_rate = hits / queries if queries else 0.0
    return Row(workload.name, system, rate, results, wall, hit_rate, share, cold.share, floor.p90())


@dataclass
class Plan:
    workloads: dict[str, list[float]]
    systems: dict[str, list[str]]
    duration: float
    rows: list[Row] = field(default_factory=list)
    predictions: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)


def systems_for(workload: str, quick: bool) -> list[str]:
    if quick:
        return ["direct random", APPROXIMATE_ROW, DEFAULT_ROW, "vllm-router cache_aware"]
    extra = {
        "shared_prefix": ["gw round_robin", "gw least_load", "gw prefix_affinity", APPROXIMATE_ROW],
        "sessions": ["gw least_load", "gw prefix_affinity", "gw session", APPROXIMATE_ROW],
        "unique": ["gw round_robin", "gw least_load", APPROXIMATE_ROW],
        "lora": ["gw least_load", "gw lora_affinity"],
        "tight_groups": ["gw least_load", "gw prefix_affinity", APPROXIMATE_ROW],
        "chats": ["gw least_load", "gw prefix_affinity", APPROXIMATE_ROW],
        "mixed": ["gw least_load", "gw prefix_affinity", APPROXIMATE_ROW],
    }[workload]
    return ["direct random", *extra, DEFAULT_ROW, "vllm-router cache_aware"]


def prediction(gateway_url: str) -> tuple[float, float]:
    """(requests whose cached tokens were predicted and reported, the share within one block) from the
    gateway's switchyard_cache_prediction_error_tokens histogram (16-token blocks on these simulators)."""
    within = total = 0.0
    for line in httpx.get(gateway_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("switchyard_cache_prediction_error_tokens_bucket{") and 'le="16.0"' in line:
            within += float(line.rsplit(" ", 1)[1])
        elif line.startswith("switchyard_cache_prediction_error_tokens_count{"):
            total += float(line.rsplit(" ", 1)[1])
    return total, (within / total if total else float("nan"))


def run_system(
    plan: Plan, name: str, system: str, rates: list[float], router: str | None, seed: int, overrides: list[str]
) -> None:
    workload = WORKLOADS[name](seed)
    with fleet(workload) as urls:
        if system == "direct random":
            target_cm: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext(None)
        elif system.startswith("gw "):
            target_cm = gateway(urls, system[3:], overrides)
        else:
            assert router is not None
            target_cm = vllm_router(router, urls)
        with target_cm as target:
            for i, rate in enumerate(rates):
                row = measure(workload, system, urls, target, rate, plan.duration, seed + i)
                plan.rows.append(row)
                print(f"  {name:<13} {system:<24} {fmt_row(row)}", flush=True)
                errors = Counter(f"{r.status} {r.error or ''}" for r in row.results if not r.ok and r.status != 429)
                if errors:
                    print(f"    failures: {dict(errors.most_common(3))}", flush=True)
            if target is not None and system.startswith("gw affinity"):
                count, share = prediction(target)
                plan.predictions[(name, system)] = (count, share)
                print(f"    cached tokens predicted within one block: {100 * share:.1f}% of {count:.0f}", flush=True)


# -- reporting ----------------------------------------------------------------------------------------

HEADER = (f"{'rate':>5} {'req/s':>6} {'TTFT p50':>8} {'p90':>7} {'p99':>7} {'e2e p99':>8} {'hit%':>5} "
          f"{'429s':>5} {'fail':>4} {'max share':>9}")  # fmt: skip


def fmt_row(row: Row) -> str:
    return (f"{row.rate:>5.0f} {row.throughput:>6.1f} {row.ttft(0.5):>7.2f}s {row.ttft(0.9):>6.2f}s "
            f"{row.ttft(0.99):>6.2f}s {row.e2e(0.99):>7.2f}s {100 * row.hit_rate:>5.1f} {row.rejected:>5} "
            f"{row.failed:>4} {row.max_share:>8.2f}x")  # fmt: skip


COLUMNS = ("rate", "req/s", "TTFT p50", "TTFT p90", "TTFT p99", "e2e p99", "hit %", "429s", "fail", "max share")


def tables(plan: Plan) -> str:
    out = []
    for name in plan.workloads:
        out.append(f"\n### {name}\n")
        out.append(f"| {'system':<24} | " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * (len(COLUMNS) + 1))
        for row in (r for r in plan.rows if r.workload == name):
            cells = fmt_row(row).split()
            out.append(f"| {row.system:<24} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def decision_rate(plan: Plan, name: str) -> float | None:
    """The first rate at which random direct's TTFT p90 exceeds 2 s (None: never in this run)."""
    for row in plan.rows:
        if row.workload == name and row.system == "direct random" and row.ttft(0.9) > 2.0:
            return row.rate
    return None


def find(plan: Plan, name: str, system: str, rate: float) -> Row | None:
    return next((r for r in plan.rows if r.workload == name and r.system == system and r.rate == rate), None)


def goals(plan: Plan) -> str:
    lines = ["\n### Goals (default policy = gw affinity)\n"]

    def check(label: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("MET" if ok else "MISSED")
        lines.append(f"- {label}: {verdict} ({detail})")

    for name, ttft_factor, thr_factor in (("shared_prefix", 5.0, 1.3), ("lora", 2.0, None)):
        if name not in plan.workloads:
            continue
        rate = decision_rate(plan, name)
        if rate is None:
            check(f"{name}: vs random direct", None, "random direct never exceeded 2 s TTFT p90")
            continue
        base, ours = find(plan, name, "direct random", rate), find(plan, name, DEFAULT_ROW, rate)
        if base is None or ours is None:
            continue
        ratio = base.ttft(0.9) / ours.ttft(0.9)
        check(f"{name} @ {rate:g}/s: TTFT p90 >= {ttft_factor:g}x lower", ratio >= ttft_factor,
              f"{base.ttft(0.9):.2f}s vs {ours.ttft(0.9):.2f}s = {ratio:.1f}x")  # fmt: skip
        if thr_factor is not None:
            gain = ours.throughput / base.throughput
            check(f"{name} @ {rate:g}/s: throughput >= {thr_factor:g}x", gain >= thr_factor,
                  f"{ours.throughput:.1f} vs {base.throughput:.1f} req/s = {gain:.2f}x")  # fmt: skip
    for name in plan.workloads:  # the thresholds of the KV-event routing issue, at every rate of every workload
        for ours in (r for r in plan.rows if r.workload == name and r.system == DEFAULT_ROW):
            base = find(plan, name, "direct random", ours.rate)
            if base is None or name == "lora":
                continue
            ratio = ours.ttft(0.9) / base.ttft(0.9) if base.ttft(0.9) else float("nan")
            best = min((r for r in plan.rows if r.workload == name and r.rate == ours.rate), key=lambda r: r.ttft(0.9))
            unreachable = ours.floor_p90 > 0.5 * base.ttft(0.9)
            floor = (f"; {100 * ours.cold_share:.0f}% of requests cold, best row {best.system} {best.ttft(0.9):.2f}s, "
                     f"oracle floor {ours.floor_p90:.2f}s = {ours.floor_p90 / base.ttft(0.9):.2f}x random"
                     + (": no router can reach 0.5x here" if unreachable else "")
                     if ratio > 0.5 else "")  # fmt: skip
            check(f"{name} @ {ours.rate:g}/s: TTFT p90 <= 0.5x random direct", ratio <= 0.5,
                  f"{ours.ttft(0.9):.2f}s vs {base.ttft(0.9):.2f}s = {ratio:.2f}x{floor}")  # fmt: skip
            check(f"{name} @ {ours.rate:g}/s: throughput >= random direct", ours.throughput >= 0.98 * base.throughput,
                  f"{ours.throughput:.1f} vs {base.throughput:.1f} req/s")  # fmt: skip
    for (name, system), (count, share) in plan.predictions.items():
        if system == DEFAULT_ROW and count:
            check(f"{name}: predicted cached tokens within one block", share >= 0.95,
                  f"{100 * share:.1f}% of {count:.0f} requests")  # fmt: skip
    for row in (r for r in plan.rows if r.workload == "unique" and r.system == DEFAULT_ROW):
        check(f"unique @ {row.rate:g}/s: no backend above 1.25x fair share", row.max_share <= 1.25,
              f"max share {row.max_share:.2f}x")  # fmt: skip
    for name in plan.workloads:
        for row in (r for r in plan.rows if r.workload == name and r.system == "vllm-router cache_aware"):
            ours = find(plan, name, DEFAULT_ROW, row.rate)
            if ours is None:
                continue
            # "at least equal": TTFT p90 no worse than vllm-router's, with 10% (or 50 ms) for noise
            ok = ours.ttft(0.9) <= max(row.ttft(0.9) * 1.1, row.ttft(0.9) + 0.05)
            check(f"{name} @ {row.rate:g}/s: >= vllm-router cache_aware", ok,
                  f"TTFT p90 {ours.ttft(0.9):.2f}s vs {row.ttft(0.9):.2f}s, "
                  f"req/s {ours.throughput:.1f} vs {row.throughput:.1f}")  # fmt: skip
    return "\n".join(lines)


def plot(plan: Plan, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    names = list(plan.workloads)
    palette = plt.get_cmap("tab10").colors
    everyone = list(dict.fromkeys(r.system for r in plan.rows))
    colors = {system: palette[i % len(palette)] for i, system in enumerate(everyone)}  # same colour per row
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        systems = dict.fromkeys(r.system for r in plan.rows if r.workload == name)
        for system in systems:
            rows = [r for r in plan.rows if r.workload == name and r.system == system]
            ax.plot([r.rate for r in rows], [r.ttft(0.9) for r in rows], marker="o", label=system, color=colors[system])
        ax.axhline(2.0, linestyle="--", color="grey", linewidth=0.8)  # where the goals are measured
        ax.set_title(name)
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("TTFT p90 (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"saved {path}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer rows, rates and seconds (~2 minutes)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    p.add_argument("--systems", default=None, help="comma-separated rows (default: per workload)")
    p.add_argument("--rates", default=None, help="comma-separated rates for every workload (override)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate")
    p.add_argument("--vllm-router", default="/tmp/vr-venv/bin/vllm-router", help="vllm-router binary")
    p.add_argument("--png", default="bench/routing.png", help="where to save the plot")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="gateway setting, e.g. "
                   "routing.spill_margin=2 (repeatable)")  # fmt: skip
    return p.parse_args()


RATES = {"shared_prefix": [15, 30, 45, 60], "sessions": [20, 40], "unique": [15, 30], "lora": [15, 25, 35],
         "tight_groups": [16, 24, 32], "chats": [32, 48, 64], "mixed": [24, 36, 48]}  # fmt: skip
QUICK_RATES = {"shared_prefix": [30, 45], "sessions": [40], "unique": [30], "lora": [25], "tight_groups": [24],
               "chats": [48], "mixed": [36]}  # fmt: skip


def main() -> int:
    ns = parse_args()
    rates = QUICK_RATES if ns.quick else RATES
    names = [n for n in ns.workloads.split(",") if n]
    fixed = [float(x) for x in ns.rates.split(",")] if ns.rates else None
    plan = Plan({n: fixed or [float(r) for r in rates[n]] for n in names}, {}, ns.duration or (5 if ns.quick else 8))
    router = ns.vllm_router if shutil.which(ns.vllm_router) else None
    notes = []
    if router is None:
        notes.append(f"vllm-router not found at {ns.vllm_router}: its row is skipped")
    started = time.monotonic()
    print(f"fleet: {SERVERS} (new workloads: {TIGHT_FLEET}) x worker.sim {' '.join(SIM_TIMING)}, KV events on; "
          f"{plan.duration:g} s of arrivals per rate")  # fmt: skip
    print(f"  {'workload':<13} {'system':<24} {HEADER}")
    for name in names:
        systems = ns.systems.split(",") if ns.systems else systems_for(name, ns.quick)
        for system in systems:
            if system.startswith("vllm-router") and router is None:
                continue
            try:
                run_system(plan, name, system, plan.workloads[name], router, ns.seed, ns.set)
            except Exception as exc:  # one broken row must not lose the others
                notes.append(f"{name} / {system}: failed: {exc.__class__.__name__}: {str(exc)[:300]}")
                print(f"  {name:<13} {system:<24} FAILED: {exc}", flush=True)
    print(tables(plan))
    print(goals(plan))
    print("\n" + plot(plan, Path(ns.png)))
    for note in notes:
        print("note:", note)
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
