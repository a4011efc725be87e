"""The gateway in front of simulated vLLM servers, driven by the official openai SDK and raw SSE reads:
pass-through fidelity, incremental streaming, client aborts reaching the engine, mid-stream failures."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim, wait_until

CHAT = [{"role": "user", "content": "Say something about switchyards."}]


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[SimProcess, SimProcess]]:
    with running_sims(sim("chat", "--lora", "chat-lora"), sim("chat")) as sims:
        yield sims[0], sims[1]


@pytest.fixture(scope="module")
def gw(fleet: tuple[SimProcess, SimProcess]) -> Iterator[GatewayServer]:
    with gateway(*(s.url for s in fleet)) as server:
        yield server


@pytest.fixture
def client(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def slow_sim(model: str, decode_ms: int) -> SimProcess:
    return sim(model, "--decode-ms-per-token", str(decode_ms), fast=False)


def sse_events(response: httpx.Response) -> Iterator[tuple[float, str]]:
    """(arrival time, data payload) per SSE event, read from the raw byte stream."""
    buffer = ""
    for text in response.iter_text():
        now = time.monotonic()
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            for line in event.splitlines():
                if line.startswith("data: "):
                    yield now, line[len("data: ") :]


def test_models_list_adapters_with_parent(client: openai.OpenAI) -> None:
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"chat", "chat-lora"}
    assert cards["chat-lora"].model_extra["parent"] == "chat"  # type: ignore[index]


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12, temperature=0, seed=7)  # type: ignore[arg-type]
    assert whole.choices[0].message.content
    assert whole.usage is not None
    assert whole.usage.completion_tokens <= 12

    stream = client.chat.completions.create(
        model="chat",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    parts = list(
        client.completions.create(model="chat", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="chat", input=["switchyard", "gateway"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 384


def test_adapter_routed_to_the_backend_that_serves_it(
    client: openai.OpenAI, fleet: tuple[SimProcess, SimProcess]
) -> None:
    before = fleet[0].metric("vllm:request_success_total")
    for _ in range(4):
        client.chat.completions.create(model="chat-lora", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    wait_until(lambda: fleet[0].metric("vllm:request_success_total") >= before + 4, 5, what="adapter requests")


def test_unknown_model_through_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="missing", messages=CHAT)  # type: ignore[arg-type]


def test_chunks_arrive_incrementally() -> None:
    with (
        running_sims(slow_sim("slow", 40)) as (upstream,),
        gateway(upstream.url) as gw,
    ):
        body = {"model": "slow", "prompt": "tick", "max_tokens": 12, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(response))
    assert events[-1][1] == "[DONE]"
    content_times = [t for t, data in events if data != "[DONE]"]
    assert len(content_times) >= 10
    # 12 tokens at 40 ms each: a buffering proxy would deliver them all at once at the end.
    assert content_times[-1] - content_times[0] >= 0.3
    gaps = [b - a for a, b in itertools.pairwise(content_times)]
    assert sum(gap >= 0.02 for gap in gaps) >= len(gaps) // 2


def running(upstream: SimProcess) -> float:
    return upstream.metric("vllm:num_requests_running")


def test_stream_abort_reaches_the_engine() -> None:
    with (
        running_sims(slow_sim("slow", 50)) as (upstream,),
        gateway(upstream.url) as gw,
    ):
        body = {"model": "slow", "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as response:
            events = sse_events(response)
            next(events)
            next(events)
            assert running(upstream) == 1
        closed = time.monotonic()
        wait_until(lambda: running(upstream) == 0, 1.0, what="engine to drop the aborted stream")
        assert time.monotonic() - closed < 1.0
        wait_until(lambda: sum(b.inflight for b in gw.registry.backends) == 0, 1.0, what="in-flight release")


def test_non_stream_abort_reaches_the_engine() -> None:
    with (
        running_sims(slow_sim("slow", 50)) as (upstream,),
        gateway(upstream.url) as gw,
    ):
        body = {"model": "slow", "prompt": "go", "max_tokens": 400, "ignore_eos": True}

        def doomed_request() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(gw.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=2.0))

        thread = threading.Thread(target=doomed_request)
        thread.start()
        wait_until(lambda: running(upstream) == 1, 5, what="request to start")
        thread.join()
        wait_until(lambda: running(upstream) == 0, 1.0, what="engine to drop the abandoned request")
        text = httpx.get(gw.url + "/metrics").text
        assert 'switchyard_requests_total{code="499",model="slow",route="/v1/completions"} 1.0' in text


def test_least_inflight_spreads_a_burst_evenly() -> None:
    a, b = (
        slow_sim("busy", 30),
        slow_sim("busy", 30),
    )
    with running_sims(a, b), gateway(a.url, b.url, routing={"policy": "least_inflight"}) as gw:
        body = {"model": "busy", "prompt": "x", "max_tokens": 500, "stream": True, "ignore_eos": True}
        streams = [httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) for _ in range(10)]
        readers = []  # keep each reader alive: a collected generator closes its response
        try:
            for stream in streams:
                readers.append(sse_events(stream.__enter__()))
                next(readers[-1])
            assert (running(a), running(b)) == (5, 5)
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)


def test_backend_dropping_mid_stream_ends_with_error_event() -> None:
    with running_sims(sim("flaky", "--drop-after-tokens", "3")) as (upstream,), gateway(upstream.url) as gw:
        body = {"model": "flaky", "prompt": "x", "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10) as response:
            assert response.status_code == 200
            payloads = [data for _, data in sse_events(response)]
    assert payloads[-1] == "[DONE]"
    assert '"error"' in payloads[-2]
    assert "connection broke" in payloads[-2]


def test_stalled_stream_times_out_with_error_event() -> None:
    with (
        running_sims(sim("stuck", "--stall-after-tokens", "2")) as (upstream,),
        gateway(upstream.url, timeouts={"idle": 0.5}) as gw,
    ):
        body = {"model": "stuck", "prompt": "x", "max_tokens": 50, "stream": True, "ignore_eos": True}
        started = time.monotonic()
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10) as response:
            payloads = [data for _, data in sse_events(response)]
        assert time.monotonic() - started < 3
    assert payloads[-1] == "[DONE]"
    assert "sent nothing for 0.5 s" in payloads[-2]


def test_silent_backend_answers_504() -> None:
    with (
        running_sims(sim("mute", "--stall-after-tokens", "0")) as (upstream,),
        gateway(upstream.url, timeouts={"first_byte": 0.5}) as gw,
    ):
        response = httpx.post(gw.url + "/v1/completions", json={"model": "mute", "prompt": "x"}, timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_models_still_answer_with_a_backend_killed() -> None:
    with running_sims(sim("left"), sim("right")) as (left, right), gateway(left.url, right.url) as gw:
        right.kill()
        wait_until(lambda: [c["id"] for c in httpx.get(gw.url + "/v1/models").json()["data"]] == ["left"], 5)
        response = httpx.post(gw.url + "/v1/completions", json={"model": "right", "prompt": "x"})
        assert response.status_code == 503
        assert httpx.post(gw.url + "/v1/completions", json={"model": "left", "prompt": "x"}).status_code == 200
