"""The routing policies and admission control through a real gateway in front of simulators."""

from __future__ import annotations

import httpx

from tests.servers import gateway, running_sims, sim, wait_until

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 8


def served(fleet_urls: list[str]) -> list[float]:
    counts = []
    for url in fleet_urls:
        text = httpx.get(url + "/metrics").text
        counts.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:request_success_total{")
            )
        )
    return counts


def test_a_shared_prefix_lands_on_one_backend_and_engine_samples_arrive() -> None:
    with running_sims(sim("m", count=4)) as (fleet,), gateway(*fleet.urls(), routing={"policy": "affinity"}) as gw:
        for i in range(12):
            body = {
                "model": "m",
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}],
                "max_tokens": 2,
            }
            assert httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
        counts = served(fleet.urls())
        assert sorted(counts) == [0.0, 0.0, 0.0, 12.0]
        wait_until(lambda: all(b.engine is not None for b in gw.registry.backends), 5, what="engine samples")


def test_a_full_admission_queue_answers_429_with_reason() -> None:
    slow = sim("m", "--decode-ms-per-token", "50", fast=False)
    with running_sims(slow) as (upstream,), gateway(upstream.url, admission={"max_inflight": 1, "queue_size": 0}) as gw:
        body = {"model": "m", "prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10) as first:
            assert first.status_code == 200
            second = httpx.post(gw.url + "/v1/completions", json=body, timeout=10)
            assert second.status_code == 429
            assert second.headers["x-switchyard-reject-reason"] == "queue_full"
            assert second.headers["retry-after"] == "1"
            assert second.json()["error"]["code"] == "queue_full"
        text = httpx.get(gw.url + "/metrics").text
        assert 'switchyard_rejected_requests_total{model="m",reason="queue_full"} 1.0' in text
