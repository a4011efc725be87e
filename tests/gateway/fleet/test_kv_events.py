"""The KV event client against simulators publishing vLLM's events over real ZMQ sockets, through a real gateway:
the index follows the engines, a repeat is predicted as cached, late joins replay, lost events rebuild, a
restarted engine is noticed, and two replicas fed the same events choose the same backends."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from tests.gateway.echo_upstream import echo_app
from tests.servers import GatewayServer, SimProcess, ThreadedServer, gateway, running_sims, sim, wait_until
from worker.procs import free_port_block

ADMIN = "kv-admin-key"
WORDS = ("signal", "switch", "yard", "track", "points", "wagon", "engine", "brake", "coupling", "ballast")


@pytest.fixture(autouse=True)
def admin_key() -> Iterator[None]:
    os.environ["KV_TEST_ADMIN_KEY"] = ADMIN
    yield
    del os.environ["KV_TEST_ADMIN_KEY"]


def kv_sim(*extra: str, count: int = 1, buffer_steps: int = 10_000) -> SimProcess:
    # One block for all the ports: 2 per server for events and replay, then the HTTP ports. Drawn apart, an
    # HTTP port could land on an event port.
    ports = free_port_block(3 * count)
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{ports}",
              "replay_endpoint": f"tcp://*:{ports + 1}", "buffer_steps": buffer_steps}  # fmt: skip
    flags = ["--enable-prefix-caching", "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(config)]
    process = sim("m", *flags, *extra, count=count)
    process.port = ports + 2 * count
    return process


def kv_gateway(*urls: str, **config: Any) -> GatewayServer:
    config.setdefault("admin", {"key_env": "KV_TEST_ADMIN_KEY"})
    config.setdefault("kv_events", {"reconcile_interval": 0.2, "backoff_initial": 0.1})
    return gateway(*urls, **config)


def fleet(gw: GatewayServer) -> dict[str, dict[str, Any]]:
    answer = httpx.get(gw.url + "/admin/fleet", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    return {backend["url"]: backend for backend in answer.json()["backends"]}


def cache(gw: GatewayServer, url: str) -> dict[str, Any]:
    state: dict[str, Any] = fleet(gw)[url]["cache"]
    return state


def system_prompt(seed: int, chars: int = 2400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(chars // 6))


def ask(gw: GatewayServer, system: str, question: str, request_id: str | None = None) -> dict[str, Any]:
    body = {"model": "m", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}  # fmt: skip
    headers = {"X-Request-Id": request_id} if request_id else {}
    answer = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def metric(gw: GatewayServer, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def test_the_index_follows_the_engine_and_a_repeat_is_predicted_as_cached() -> None:
    with running_sims(kv_sim()) as (upstream,), kv_gateway(upstream.url) as gw:
        wait_until(lambda: cache(gw, upstream.url)["state"] == "live", 10, what="subscribed")
        system = system_prompt(1)
        first = ask(gw, system, "Where is the yard?")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        blocks = first["usage"]["prompt_tokens"] // 16
        wait_until(lambda: cache(gw, upstream.url)["blocks"] >= blocks, 10, what="blocks indexed")
        before_predicted = metric(gw, "switchyard_cached_tokens_predicted_total", backend=upstream.url)
        second = ask(gw, system, "Where are the points?")
        reported = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert reported >= 16 * (blocks - 2)  # the system prompt's blocks (the question's differ)
        predicted = metric(gw, "switchyard_cached_tokens_predicted_total", backend=upstream.url) - before_predicted
        assert abs(predicted - reported) <= 16  # within one block
        state = cache(gw, upstream.url)
        assert state["block_size"] == 16
        (source,) = state["events"]["sources"]
        assert source["connected"]
        assert source["last_seq"] >= 0
        assert metric(gw, "switchyard_kv_events_total", backend=upstream.url) >= 1
        assert metric(gw, "switchyard_kv_event_gaps_total", backend=upstream.url, outcome="lost") == 0


def test_a_late_subscriber_replays_the_history_and_knows_the_cache() -> None:
    with running_sims(kv_sim()) as (upstream,):
        system = system_prompt(2)
        body = {"model": "m", "max_tokens": 2, "messages": [{"role": "system", "content": system}]}
        assert httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        with kv_gateway(upstream.url) as gw:  # joins after the events were published
            wait_until(lambda: cache(gw, upstream.url)["state"] == "live", 10, what="replayed")
            assert cache(gw, upstream.url)["blocks"] >= len(system) // 64 - 1


def test_history_the_replay_no_longer_holds_means_a_rebuild_never_stale_truth() -> None:
    with running_sims(kv_sim(buffer_steps=2)) as (upstream,):
        for seed in range(4):  # four batches: the first two fall out of a two-batch buffer
            body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": system_prompt(seed, 800)}]}
            assert httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        with kv_gateway(upstream.url) as gw:
            wait_until(lambda: cache(gw, upstream.url)["state"] == "rebuilding", 10, what="rebuilding")
            assert metric(gw, "switchyard_kv_event_gaps_total", backend=upstream.url, outcome="lost") == 1


def test_a_restarted_engine_is_noticed_and_its_old_blocks_dropped() -> None:
    upstream = kv_sim("--seed", "3")
    with running_sims(upstream), kv_gateway(upstream.url, health={"interval": 0.2, "unhealthy_threshold": 1}) as gw:
        wait_until(lambda: cache(gw, upstream.url)["state"] == "live", 10, what="subscribed")
        ask(gw, system_prompt(4), "Which track?")
        wait_until(lambda: cache(gw, upstream.url)["blocks"] > 10, 10, what="blocks indexed")
        upstream.kill()  # kill -9: its cache is gone with it
        wait_until(lambda: cache(gw, upstream.url)["state"] == "unknown", 10, what="marked unknown")
        assert cache(gw, upstream.url)["blocks"] == 0
        upstream.start()  # the same ports, a new engine with an empty cache and a new sequence
        wait_until(lambda: cache(gw, upstream.url)["state"] == "live", 15, what="subscribed again")
        assert cache(gw, upstream.url)["blocks"] == 0
        again = ask(gw, system_prompt(4), "Which track?")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_two_replicas_fed_the_same_events_choose_the_same_backends(caplog: pytest.LogCaptureFixture) -> None:
    """A shared-prefix workload sent to two gateway replicas at once, request by request: at least 95% of the
    requests go to the same backend from both (the access log names each request's backend)."""
    systems = [system_prompt(100 + g) for g in range(8)]
    rng = random.Random(5)
    with (
        running_sims(kv_sim(count=4)) as (upstreams,),
        kv_gateway(*upstreams.urls()) as one,
        kv_gateway(*upstreams.urls()) as two,
        caplog.at_level(logging.INFO, logger="switchyard.access"),
    ):
        for gw in (one, two):
            wait_until(lambda gw=gw: all(c["cache"]["state"] == "live" for c in fleet(gw).values()), 10)
        for i in range(80):
            system = rng.choice(systems)
            threads = [
                threading.Thread(target=ask, args=(gw, system, f"question {i}", f"{name}-{i}"))
                for name, gw in (("one", one), ("two", two))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        backends: dict[str, str] = {}
        for record in caplog.records:
            if record.name == "switchyard.access":
                line = json.loads(record.getMessage())
                backends[line["request_id"]] = line["backend"]
        same = sum(backends[f"one-{i}"] == backends[f"two-{i}"] for i in range(80))
        assert same >= 0.95 * 80, f"{same} of 80 requests went to the same backend"
        assert len({backends[f"one-{i}"] for i in range(80)}) > 1  # and the groups did spread over the fleet


def test_a_backend_with_two_ranks_is_live_only_once_both_have_synced() -> None:
    """A data-parallel backend publishes from one socket per rank. Rank 0 here is a real publisher (a
    simulator's); rank 1's publisher never answers. The first rank to catch up must not make the whole cache
    known: the blocks rank 1 holds are unknown."""
    with running_sims(kv_sim()) as (publisher,):
        rank0 = httpx.get(publisher.url + "/kv_event_sources", timeout=10).json()["0"]
        silent = free_port_block(2)
        rank1 = {**rank0, "endpoint": f"tcp://*:{silent}", "replay_endpoint": f"tcp://*:{silent + 1}"}

        async def sources(request: Request) -> Response:
            return JSONResponse({"0": rank0, "1": rank1})

        front = Starlette(routes=[Route("/kv_event_sources", sources), Mount("/", echo_app(["m"]))])
        with ThreadedServer(front) as backend, kv_gateway(backend.url) as gw:
            connected = lambda: [s["connected"] for s in cache(gw, backend.url)["events"]["sources"]]  # noqa: E731
            wait_until(lambda: connected() == [True, False], 10, what="rank 0 to catch up")
            time.sleep(0.5)  # several reconcile rounds: the state has settled
            assert cache(gw, backend.url)["state"] != "live"
