"""The gateway is an ASGI app: embedded in another ASGI server (uvicorn's own protocol here, not the gateway's),
it streams, counts usage, answers errors in the OpenAI shape and cancels the upstream request of a client that
left, the last through the http.disconnect message instead of the gateway server's callback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim, wait_until


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with running_sims(sim("slow", "--decode-ms-per-token", "20", fast=False)) as (server,):
        yield server


@pytest.fixture(scope="module")
def gw(upstream: SimProcess) -> Iterator[GatewayServer]:
    with gateway(upstream.url, asgi_server=True) as server:
        yield server


def test_streams_and_answers_through_another_asgi_server(gw: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="slow",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gw.url + "/metrics").text
    assert 'switchyard_tokens_total{kind="completion",model="slow"} 5.0' in text


def test_a_client_that_left_cancels_the_upstream_request(gw: GatewayServer, upstream: SimProcess) -> None:
    body = {"model": "slow", "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
        chunks = response.iter_bytes()  # kept: a collected generator would close the response
        assert next(chunks).startswith(b"data: ")
        wait_until(lambda: upstream.metric("vllm:num_requests_running") == 1, 5, what="the stream to run")
    closed = time.monotonic()
    wait_until(lambda: upstream.metric("vllm:num_requests_running") == 0, 2, what="the engine to drop it")
    assert time.monotonic() - closed < 2
