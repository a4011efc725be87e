"""What a gateway relies on from a vLLM server: shapes, SSE framing, metric names, error statuses.

Runs against the simulator in every CI run and against real vLLM in the e2e suite (see conftest),
so every assertion here must hold for real vLLM too (facts: shared/notes/vllm-api.md).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.conformance.conftest import Target

Json = dict[str, Any]

REQUIRED_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:cache_config_info",
)


def chat_body(target: Target, **extra: Any) -> Json:
    return {"model": target.model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, **extra}


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its `data:` payloads, checking the framing on the way."""
    assert raw.endswith(b"\n\n"), "an SSE body ends with a blank line"
    events = raw.split(b"\n\n")[:-1]
    for event in events:
        assert event.startswith(b"data: "), event
    return [e[len(b"data: ") :] for e in events]


def stream(target: Target, path: str, body: Json) -> tuple[httpx.Response, list[bytes]]:
    with target.client() as http:
        r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, sse_events(r.content)


def test_health_is_200_with_empty_body(target: Target) -> None:
    with target.client() as http:
        r = http.get("/health")
    assert r.status_code == 200
    assert r.content == b""


def test_models_cards(target: Target) -> None:
    with target.client() as http:
        body = http.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {c["id"]: c for c in body["data"]}
    base = cards[target.model]
    for key in ("id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"):
        assert key in base
    assert base["object"] == "model"
    assert base["owned_by"] == "vllm"
    assert base["parent"] is None
    assert isinstance(base["max_model_len"], int)
    assert isinstance(base["permission"], list)
    if target.lora:
        assert cards[target.lora]["parent"] == target.model


def test_chat_completion_shape(target: Target) -> None:
    with target.client() as http:
        body = http.post("/v1/chat/completions", json=chat_body(target)).json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == target.model
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert "stop_reason" in choice
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 4


def test_completion_shape_and_length_finish(target: Target) -> None:
    body = {"model": target.model, "prompt": "The sky is", "max_tokens": 3, "ignore_eos": True}
    with target.client() as http:
        out = http.post("/v1/completions", json=body).json()
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert out["choices"][0]["finish_reason"] == "length"
    assert isinstance(out["choices"][0]["text"], str)
    assert out["usage"]["completion_tokens"] == 3


def test_chat_stream_framing(target: Target) -> None:
    _, events = stream(target, "/v1/chat/completions", chat_body(target, stream=True))
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finals) == 1
    assert finals[0] is chunks[-1]
    assert finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "stop_reason" in finals[0]["choices"][0]
    assert all(c.get("usage") is None for c in chunks)


def test_stream_include_usage_adds_a_usage_chunk(target: Target) -> None:
    body = chat_body(target, stream=True, stream_options={"include_usage": True}, max_tokens=3, ignore_eos=True)
    _, events = stream(target, "/v1/chat/completions", body)
    assert events[-1] == b"[DONE]"
    last = orjson.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3


def test_completions_stream_framing(target: Target) -> None:
    body = {"model": target.model, "prompt": "One two", "max_tokens": 3, "ignore_eos": True, "stream": True}
    _, events = stream(target, "/v1/completions", body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(isinstance(c["choices"][0]["text"], str) for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_lora_adapter_answers_under_its_name(target: Target) -> None:
    if not target.lora:
        pytest.skip("no LoRA adapter configured for this target")
    with target.client() as http:
        out = http.post("/v1/completions", json={"model": target.lora, "prompt": "Hi", "max_tokens": 2}).json()
    assert out["model"] == target.lora


def test_unknown_model_is_404(target: Target) -> None:
    with target.client() as http:
        r = http.post("/v1/chat/completions", json={**chat_body(target), "model": "no-such-model"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "NotFoundError"
    assert err["param"] == "model"
    # vLLM 0.32 adds "Valid aliases: <served name>." after the sentence.
    assert err["message"].startswith("The model `no-such-model` does not exist.")
    assert err["code"] == 404


def test_bad_body_is_400(target: Target) -> None:
    with target.client() as http:
        r = http.post("/v1/chat/completions", json={"model": target.model})
    assert r.status_code == 400
    assert "error" in r.json()


def test_stream_options_without_stream_is_400(target: Target) -> None:
    with target.client() as http:
        r = http.post("/v1/chat/completions", json=chat_body(target, stream_options={"include_usage": True}))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400


def test_prompt_over_max_model_len_is_400(target: Target) -> None:
    with target.client() as http:
        max_len = next(c for c in http.get("/v1/models").json()["data"] if c["id"] == target.model)["max_model_len"]
        r = http.post("/v1/completions", json={"model": target.model, "prompt": "hello " * (max_len + 16),
                                               "max_tokens": 4})  # fmt: skip
    assert r.status_code == 400


def test_tokenize(target: Target) -> None:
    with target.client() as http:
        out = http.post("/tokenize", json={"model": target.model, "prompt": "Hello world"}).json()
    assert out["count"] == len(out["tokens"]) > 0
    assert isinstance(out["max_model_len"], int)


def test_metric_names_and_labels(target: Target) -> None:
    with target.client() as http:
        http.post("/v1/completions", json={"model": target.model, "prompt": "warm up", "max_tokens": 2})
        text = http.get("/metrics").text
    for name in REQUIRED_METRICS:
        assert f"\n{name}{{" in text, f"{name} missing from /metrics"
    assert f'model_name="{target.model}"' in text
    assert 'engine="0"' in text
    if target.lora:
        assert "\nvllm:lora_requests_info{" in text
