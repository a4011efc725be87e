"""KV cache events and cached-token usage, on by default, from the real vLLM workers `switchyard up` starts."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import msgspec
import pytest
import zmq

from tests.e2e.conftest import E2EStack

pytestmark = pytest.mark.e2e


def _long_prompt() -> str:
    """About 400 tokens (three 128-token KV blocks and more), unique to this call so no block is cached yet."""
    return f"{uuid.uuid4().hex} " + " ".join(f"item {i}," for i in range(130))


def _complete(e2e: E2EStack, prompt: str) -> dict[str, Any]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 1}
    response = httpx.post(f"{e2e.gateway}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def test_the_chat_worker_publishes_kv_events_on_the_ports_the_stack_gave_it(e2e: E2EStack) -> None:
    ports = e2e.stack.kv_ports["chat"]
    sources = httpx.get(f"{e2e.chat_worker}/kv_event_sources", timeout=10).json()
    assert sources["0"]["endpoint"] == f"tcp://*:{ports.events}"
    assert sources["0"]["replay_endpoint"] == f"tcp://*:{ports.replay}"
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{ports.events}")
        time.sleep(1.0)  # a SUB socket misses what is published before it has joined
        _complete(e2e, _long_prompt())
        stored = 0
        deadline = time.monotonic() + 60
        while not stored and time.monotonic() < deadline:
            if sub.poll(timeout=1000):
                _topic, seq, payload = sub.recv_multipart()
                assert len(seq) == 8
                _ts, events, *_ = msgspec.msgpack.decode(payload)
                stored += sum(1 for event in events if event.get("type") == "BlockStored")
        assert stored, "no BlockStored event within 60 s"
    finally:
        sub.close(linger=0)
        context.term()


def test_a_repeated_prompt_reports_its_cached_tokens(e2e: E2EStack) -> None:
    prompt = _long_prompt()
    first = _complete(e2e, prompt)["usage"]
    second = _complete(e2e, prompt)["usage"]
    assert first["prompt_tokens"] > 256
    assert (first.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    assert second["prompt_tokens_details"]["cached_tokens"] >= 256  # whole 128-token blocks from the prefix cache


def test_the_embedding_worker_runs_without_prefix_caching(e2e: E2EStack) -> None:
    embed = next(c for c in e2e.stack.workers if c.name == "embed")
    command = embed.log.read_text().splitlines()[0]  # the launcher's "starting vLLM (cpu): ..." line
    assert command.startswith("switchyard-worker: starting vLLM")
    assert "--enable-prefix-caching" not in command
    assert "--kv-events-config" not in command
    assert "--enable-prompt-tokens-details" in command
    assert "embed" not in e2e.stack.kv_ports


def _metric(e2e: E2EStack, name: str, backend: str) -> float:
    total = 0.0
    for line in httpx.get(f"{e2e.gateway}/metrics", timeout=10).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and f'backend="{backend}"' in series:
            total += float(value)
    return total


def _chat(e2e: E2EStack, system: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which item is first?"}]
    body = {"model": "smollm2", "max_tokens": 1, "temperature": 0, "messages": messages}
    response = httpx.post(f"{e2e.gateway}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def _wait(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_gateway_indexes_the_real_engines_blocks_and_predicts_a_repeat(e2e: E2EStack) -> None:
    """Through the gateway: the KV events of the real worker fill its precise index, and a repeated long prompt
    is predicted as cached within one 128-token block of what vLLM itself reports."""
    chat = e2e.chat_worker
    _wait(lambda: e2e.fleet()[chat]["cache"]["state"] == "live", 60, "the gateway's subscription")
    system = _long_prompt()
    first = _chat(e2e, system)["usage"]
    blocks = first["prompt_tokens"] // 128
    assert blocks >= 3
    _wait(lambda: e2e.fleet()[chat]["cache"]["blocks"] >= blocks, 60, "the prompt's blocks in the index")
    assert e2e.fleet()[chat]["cache"]["block_size"] == 128
    predicted = _metric(e2e, "switchyard_cached_tokens_predicted_total", chat)
    second = _chat(e2e, system)["usage"]
    reported = second["prompt_tokens_details"]["cached_tokens"]
    assert reported >= 128 * (blocks - 1)
    predicted = _metric(e2e, "switchyard_cached_tokens_predicted_total", chat) - predicted
    assert abs(predicted - reported) <= 128, (predicted, reported)


def test_a_cleared_cache_is_noticed_and_not_trusted(e2e: E2EStack) -> None:
    """vLLM's AllBlocksCleared (here from POST /reset_prefix_cache) empties the worker's part of the index: the
    prompt cached before is predicted, and reported, as not cached."""
    chat = e2e.chat_worker
    system = _long_prompt()
    _chat(e2e, system)
    _wait(lambda: e2e.fleet()[chat]["cache"]["blocks"] >= 3, 60, "blocks in the index")
    reset = httpx.post(f"{chat}/reset_prefix_cache", timeout=30)
    assert reset.json() == {"success": True}
    # The event goes out with the engine's next step: any request makes one.
    _chat(e2e, _long_prompt())
    predicted = _metric(e2e, "switchyard_cached_tokens_predicted_total", chat)
    again = _chat(e2e, system)["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] == 0
    assert _metric(e2e, "switchyard_cached_tokens_predicted_total", chat) == predicted  # predicted nothing cached
