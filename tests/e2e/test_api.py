"""The OpenAI API through the gateway to real vLLM workers, with the official openai SDK."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import E2EStack

pytestmark = pytest.mark.e2e

HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def client(e2e: E2EStack) -> OpenAI:
    return e2e.client()


def test_chat_non_streaming(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert r.model == "smollm2"
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None
    assert r.usage.completion_tokens > 0


def test_chat_streaming_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=HAIKU, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == 16 or finishes == ["stop"]


def test_completions(client: OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 8


def test_embeddings(client: OpenAI) -> None:
    r = client.embeddings.create(model="minilm", input=["a cat sat on the mat", "stocks fell sharply"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 384
    assert r.data[0].embedding != r.data[1].embedding


def test_models_lists_both_models_and_both_adapters_with_parent(client: OpenAI) -> None:
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert {"smollm2", "lora-a", "lora-b", "minilm"} <= set(cards)
    assert cards["lora-a"]["parent"] == "smollm2"
    assert cards["lora-b"]["parent"] == "smollm2"
    assert cards["smollm2"]["parent"] is None
    assert cards["minilm"]["parent"] is None


def test_each_adapter_changes_the_output_at_temperature_zero(client: OpenAI) -> None:
    def answer(model: str) -> str:
        r = client.chat.completions.create(model=model, messages=HAIKU, max_tokens=25, temperature=0)
        assert r.model == model
        return r.choices[0].message.content or ""

    base, a, b = answer("smollm2"), answer("lora-a"), answer("lora-b")
    assert base == answer("smollm2")  # deterministic at temperature 0
    assert len({base, a, b}) == 3, (base, a, b)


def test_tool_definitions_are_answered_with_a_tool_call(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=100,  # room for the whole call: a truncated one is not parsed into tool_calls
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert calls
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]


def test_multi_turn_with_a_tool_result(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius"},
            {"role": "user", "content": "So should I take an umbrella?"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=24,
    )
    assert r.choices[0].message.content
    assert r.usage is not None
    assert r.usage.prompt_tokens > 40  # every turn reached the model


def test_sixteen_concurrent_streams_complete(e2e: E2EStack) -> None:
    client = e2e.client(timeout=300)

    def one(i: int) -> tuple[str, str | None, bool]:
        model = ("smollm2", "lora-a", "lora-b")[i % 3]
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, False
        for chunk in stream:
            usage = usage or chunk.usage is not None
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, usage

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(text and finish in ("stop", "length") and usage for text, finish, usage in results), results


def test_client_abort_mid_stream_frees_the_worker_within_a_second(e2e: E2EStack) -> None:
    running = "vllm:num_requests_running"
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            f"{e2e.gateway}/v1/chat/completions",
            json={"model": "smollm2", "messages": HAIKU, "max_tokens": 1500, "stream": True, "ignore_eos": True},
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        assert e2e.metric(e2e.chat_worker, running) >= 1
    aborted = time.monotonic()
    while e2e.metric(e2e.chat_worker, running) > 0:
        assert time.monotonic() - aborted < 1.0, "the worker still runs the aborted request after 1 s"
        time.sleep(0.05)
