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
