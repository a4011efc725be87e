"""What a gateway relies on from a vLLM server: shapes, SSE framing, metric names, error statuses.

Runs against the simulator in every CI run and against real vLLM in the e2e suite (see conftest),
so every assertion here must hold for real vLLM too (facts: shared/notes/vllm-api.md).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.conformance import kv_events_client as kv
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


# ----- return_token_ids (vLLM's extension; what mid-stream failover continues from) -----


def test_return_token_ids_chat_non_stream(target: Target) -> None:
    with target.client() as http:
        out = http.post("/v1/chat/completions", json=chat_body(target, return_token_ids=True)).json()
        plain = http.post("/v1/chat/completions", json=chat_body(target)).json()
    choice, usage = out["choices"][0], out["usage"]
    assert isinstance(out["prompt_token_ids"], list)
    assert len(out["prompt_token_ids"]) == usage["prompt_tokens"]
    assert all(isinstance(t, int) for t in out["prompt_token_ids"] + choice["token_ids"])
    assert len(choice["token_ids"]) == usage["completion_tokens"]
    assert plain["prompt_token_ids"] is None
    assert plain["choices"][0]["token_ids"] is None


def test_return_token_ids_completion_non_stream(target: Target) -> None:
    prompt = "Token ids of a prompt"
    with target.client() as http:
        body = {"model": target.model, "prompt": prompt, "max_tokens": 3, "return_token_ids": True}
        out = http.post("/v1/completions", json=body).json()
        tokens = http.post("/tokenize", json={"model": target.model, "prompt": prompt}).json()["tokens"]
    choice = out["choices"][0]
    assert out.get("prompt_token_ids") is None  # completions put them in the choice
    assert choice["prompt_token_ids"] == tokens
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"]


def test_return_token_ids_chat_stream_chunks(target: Target) -> None:
    body = chat_body(target, stream=True, return_token_ids=True, stream_options={"include_usage": True})
    _, events = stream(target, "/v1/chat/completions", body)
    chunks = [orjson.loads(e) for e in events[:-1]]
    first, usage = chunks[0], chunks[-1]["usage"]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "token_ids" not in first["choices"][0]
    assert len(first["prompt_token_ids"]) == usage["prompt_tokens"]
    content = [c for c in chunks[1:] if c["choices"]]
    assert all(c.get("prompt_token_ids") is None for c in chunks[1:])
    ids = [t for c in content for t in c["choices"][0]["token_ids"]]
    assert all(isinstance(t, int) for t in ids)
    assert len(ids) == usage["completion_tokens"]
    assert all(len(c["choices"][0]["token_ids"]) >= 1 for c in content)
    _, plain = stream(target, "/v1/chat/completions", chat_body(target, stream=True))
    plain_chunks = [orjson.loads(e) for e in plain[:-1]]
    assert plain_chunks[0]["prompt_token_ids"] is None
    assert all(c["choices"][0]["token_ids"] is None for c in plain_chunks[1:])


def test_return_token_ids_completion_stream_chunks(target: Target) -> None:
    body = {"model": target.model, "prompt": "Count on", "max_tokens": 4, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}  # fmt: skip
    _, events = stream(target, "/v1/completions", body)
    chunks = [orjson.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert len(choices[0]["prompt_token_ids"]) == usage["prompt_tokens"]
    assert all(c["prompt_token_ids"] is None for c in choices[1:])
    assert sum(len(c["token_ids"]) for c in choices) == usage["completion_tokens"] == 4


def test_prompt_token_ids_in_are_prompt_token_ids_out(target: Target) -> None:
    """A continuation on token ids: the prompt plus the first generated ids go back in unchanged."""
    with target.client() as http:
        first = http.post("/v1/completions", json={"model": target.model, "prompt": "Once upon a time",
                                                    "max_tokens": 4, "ignore_eos": True,
                                                    "return_token_ids": True}).json()  # fmt: skip
        choice = first["choices"][0]
        resumed = choice["prompt_token_ids"] + choice["token_ids"][:2]
        again = http.post("/v1/completions", json={"model": target.model, "prompt": resumed, "max_tokens": 2,
                                                    "return_token_ids": True}).json()  # fmt: skip
    assert again["choices"][0]["prompt_token_ids"] == resumed
    assert again["usage"]["prompt_tokens"] == len(resumed)


# ----- chat continue_final_message / add_generation_prompt -----

CONVERSATION = [{"role": "user", "content": "Name three colours."}]


def test_continue_final_message_with_generation_prompt_is_400(target: Target) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "Red,"}]
    with target.client() as http:
        both = http.post("/v1/chat/completions", json={"model": target.model, "messages": messages, "max_tokens": 2,
                                                        "continue_final_message": True,
                                                        "add_generation_prompt": True})  # fmt: skip
        default = http.post("/v1/chat/completions", json={"model": target.model, "messages": messages,
                                                           "max_tokens": 2,
                                                           "continue_final_message": True})  # fmt: skip
    for r in (both, default):
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "BadRequestError"
        assert r.json()["error"]["code"] == 400
    assert both.json()["error"]["message"] == (
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    )
    assert default.json()["error"]["message"].startswith(
        "continue_final_message and add_generation_prompt are not compatible."
    )


def test_continue_final_message_extends_the_assistant_prompt(target: Target) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "Red,"}]
    body = {"model": target.model, "max_tokens": 3, "return_token_ids": True}
    with target.client() as http:
        fresh = http.post("/v1/chat/completions", json={**body, "messages": CONVERSATION}).json()
        cont = http.post("/v1/chat/completions", json={**body, "messages": messages, "continue_final_message": True,
                                                       "add_generation_prompt": False}).json()  # fmt: skip
    assert cont["choices"][0]["message"]["role"] == "assistant"
    head = fresh["prompt_token_ids"]  # the conversation and the assistant header
    assert cont["prompt_token_ids"][: len(head)] == head
    assert len(cont["prompt_token_ids"]) > len(head)  # then the open assistant message, no end-of-turn
    assert cont["usage"]["prompt_tokens"] == len(cont["prompt_token_ids"])


def test_continue_final_message_stream_opens_as_assistant(target: Target) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "Red,"}]
    body = {"model": target.model, "messages": messages, "max_tokens": 2, "stream": True,
            "continue_final_message": True, "add_generation_prompt": False}  # fmt: skip
    _, events = stream(target, "/v1/chat/completions", body)
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_without_generation_prompt_the_answer_takes_the_last_role(target: Target) -> None:
    body = {"model": target.model, "messages": CONVERSATION, "max_tokens": 2, "add_generation_prompt": False}
    with target.client() as http:
        out = http.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"]["role"] == "user"


# ----- prefix caching: prompt_tokens_details, /kv_event_sources, KV cache events -----

KV_SOURCE_KEYS = {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "buffer_steps", "hwm",
                  "max_queue_size", "topic"}  # fmt: skip


def block_size(target: Target) -> int:
    with target.client() as http:
        text = http.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("vllm:cache_config_info{"))
    match = re.search(r'[{,]block_size="(\d+)"', line)
    assert match is not None, line
    return int(match.group(1))


def long_prompt(target: Target, min_tokens: int) -> str:
    """A prompt no earlier request shared (a fresh first block) of at least `min_tokens` tokens."""
    head = f"Conformance probe {uuid.uuid4().hex}. "
    words = 32
    with target.client() as http:
        while True:
            prompt = head + " ".join(f"item{i}" for i in range(words))
            n = http.post("/tokenize", json={"model": target.model, "prompt": prompt}).json()["count"]
            if n >= min_tokens:
                return prompt
            words = words * min_tokens // max(n, 1) + 8


def test_kv_event_sources_shape(target: Target) -> None:
    with target.client() as http:
        r = http.get("/kv_event_sources")
    assert r.status_code == 200
    sources = r.json()
    if not target.kv_events:
        assert sources == {}  # no --kv-events-config: no publisher
        return
    assert set(sources) == {"0"}  # one engine: data-parallel rank 0
    cfg = sources["0"]
    assert set(cfg) == KV_SOURCE_KEYS
    assert cfg["enable_kv_cache_events"] is True
    assert cfg["publisher"] == "zmq"
    assert cfg["endpoint"].startswith("tcp://")
    assert isinstance(cfg["replay_endpoint"], str)
    assert isinstance(cfg["buffer_steps"], int)
    assert isinstance(cfg["topic"], str)


def _usage_chunk(target: Target, path: str, body: Json) -> Json:
    _, events = stream(target, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    usage: Json = orjson.loads(events[-2])["usage"]
    return usage


def test_prompt_tokens_details_shape(target: Target) -> None:
    completion = {"model": target.model, "prompt": "Details of the prompt", "max_tokens": 2}
    with target.client() as http:
        chat_usage = http.post("/v1/chat/completions", json=chat_body(target)).json()["usage"]
        completion_usage = http.post("/v1/completions", json=completion).json()["usage"]
    chat_stream = _usage_chunk(target, "/v1/chat/completions", chat_body(target))
    completion_stream = _usage_chunk(target, "/v1/completions", completion)
    if not target.prompt_tokens_details:
        assert chat_usage["prompt_tokens_details"] is None
        assert completion_usage["prompt_tokens_details"] is None
        assert "prompt_tokens_details" not in chat_stream
        assert "prompt_tokens_details" not in completion_stream
        return
    assert set(chat_usage["prompt_tokens_details"]) == {"cached_tokens", "created_cache_tokens", "multimodal_tokens"}
    assert isinstance(chat_usage["prompt_tokens_details"]["created_cache_tokens"], int)
    assert completion_usage["prompt_tokens_details"]["created_cache_tokens"] is None
    assert set(completion_usage["prompt_tokens_details"]) == {"cached_tokens", "created_cache_tokens",
                                                              "multimodal_tokens"}  # fmt: skip
    assert set(chat_stream["prompt_tokens_details"]) == {"cached_tokens", "created_cache_tokens"}
    assert set(completion_stream["prompt_tokens_details"]) == {"cached_tokens"}


def test_cached_tokens_count_whole_blocks_of_a_repeated_prompt(target: Target) -> None:
    if not target.prompt_tokens_details:
        pytest.skip("the target runs without --enable-prompt-tokens-details")
    bs = block_size(target)
    body = {"model": target.model, "prompt": long_prompt(target, 2 * bs + 3), "max_tokens": 1,
            "return_token_ids": True}  # fmt: skip
    with target.client(timeout=120) as http:
        first = http.post("/v1/completions", json=body).json()
        second = http.post("/v1/completions", json=body).json()
    n = second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # every full block but the one holding the last prompt token (always computed) is a hit
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // bs * bs


def _stored_chain(messages: list[kv.Message], prompt_ids: list[int], bs: int) -> list[kv.BlockStored]:
    """The BlockStored events, in order, that cached the leading blocks of `prompt_ids`."""
    chain: list[kv.BlockStored] = []
    covered = 0
    for msg in messages:
        for event in msg.batch.events:
            if not isinstance(event, kv.BlockStored) or not event.token_ids:
                continue
            if event.token_ids == prompt_ids[covered : covered + len(event.token_ids)] and (
                (covered == 0 and event.parent_block_hash is None)
                or (chain and event.parent_block_hash == chain[-1].block_hashes[-1])
            ):
                chain.append(event)
                covered += len(event.token_ids)
    return chain


def _kv_roundtrip(target: Target, model: str) -> None:
    with target.client() as http:
        cfg = http.get("/kv_event_sources").json()["0"]
    bs = block_size(target)
    sub = kv.Subscriber(kv.connect_address(cfg["endpoint"], target.url))
    try:
        time.sleep(0.5)  # a SUB socket misses what is published before its subscription arrives
        body = {"model": model, "prompt": long_prompt(target, 2 * bs + 3), "max_tokens": 2,
                "return_token_ids": True}  # fmt: skip
        with target.client(timeout=120) as http:
            prompt_ids = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_token_ids"]
        full = len(prompt_ids) // bs * bs
        messages = sub.messages(timeout=5, until=lambda got: len(_stored_chain(got, prompt_ids, bs)) and sum(
            len(e.token_ids) for e in _stored_chain(got, prompt_ids, bs)) >= full)  # fmt: skip
    finally:
        sub.close()
    assert messages, "no KV event batch arrived"
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers go up by one"
    assert {m.topic for m in messages} == {cfg["topic"].encode()}
    for m in messages:
        assert m.batch.data_parallel_rank == 0
        assert abs(m.batch.ts - time.time()) < 300
    chain = _stored_chain(messages, prompt_ids, bs)
    assert sum(len(e.token_ids) for e in chain) == full
    for event in chain:
        assert len(event.token_ids) == bs * len(event.block_hashes)
        assert event.block_size == bs
        assert event.medium == "GPU"
        assert event.group_idx == 0
        assert event.kv_cache_spec_kind == "full_attention"
        assert event.extra_keys is not None
        assert len(event.extra_keys) == len(event.block_hashes)
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in event.block_hashes)
        if model == target.model:
            assert (event.lora_name, event.lora_id) == (None, None)
            assert event.extra_keys == [None] * len(event.block_hashes)
        else:
            assert event.lora_name == model
            assert isinstance(event.lora_id, int)
            assert event.extra_keys == [(model,)] * len(event.block_hashes)
    replayed, ended = kv.replay(kv.connect_address(cfg["replay_endpoint"], target.url), seqs[0])
    assert ended, "the replay ends with vLLM's end marker"
    by_seq = {m.seq: m.batch for m in replayed}
    assert all(by_seq[m.seq] == m.batch for m in messages), "replay returns the batches that were published"


def test_kv_events_store_the_prompt_blocks(target: Target) -> None:
    if not target.kv_events:
        pytest.skip("the target publishes no KV events (see tests/conformance/conftest.py)")
    _kv_roundtrip(target, target.model)


def test_kv_events_name_the_lora_adapter(target: Target) -> None:
    if not target.kv_events or not target.lora:
        pytest.skip("the target publishes no KV events or serves no LoRA adapter")
    _kv_roundtrip(target, target.lora)
