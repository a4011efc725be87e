"""The simulator's OpenAI-compatible API over a real loopback port, with the openai SDK and httpx."""

from __future__ import annotations

import math

import httpx
import openai
import orjson
import pytest

from tests.worker.sim.conftest import RunningSim, SimFactory


def client(sim: RunningSim) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)


async def test_models_list_has_base_and_lora_cards(sim: RunningSim) -> None:
    models = await client(sim).models.list()
    cards = {m.id: m.model_dump() for m in models.data}
    assert set(cards) == {"sim", "sim-lora"}
    base, lora = cards["sim"], cards["sim-lora"]
    assert base["owned_by"] == "vllm"
    assert base["object"] == "model"
    assert base["parent"] is None
    assert base["root"] == "sim"
    assert base["max_model_len"] == 2048
    assert lora["parent"] == "sim"
    assert lora["root"] == "/loras/sim-lora"
    assert lora["permission"][0]["object"] == "model_permission"


async def test_chat_non_stream(sim: RunningSim) -> None:
    resp = await client(sim).chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, seed=7
    )
    assert resp.object == "chat.completion"
    assert resp.model == "sim"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5
    assert len((choice.message.content or "").split()) == 5


async def test_chat_stream_with_usage(sim: RunningSim) -> None:
    stream = await client(sim).chat.completions.create(
        model="sim-lora",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 4
    assert {c.model for c in chunks} == {"sim-lora"}


async def test_completions_stream_and_not(sim: RunningSim) -> None:
    api = client(sim)
    whole = await api.completions.create(model="sim", prompt="once upon a time", max_tokens=6, seed=1)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    stream = await api.completions.create(model="sim", prompt="once upon a time", max_tokens=6, seed=1, stream=True)
    pieces = [c.choices[0].text async for c in stream]
    assert "".join(pieces) == whole.choices[0].text  # same prompt and seed, same text


async def test_natural_stop_and_stop_strings(sim: RunningSim) -> None:
    api = client(sim)
    resp = await api.completions.create(model="sim", prompt="x", max_tokens=1000, seed=3)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert 8 <= resp.usage.completion_tokens <= 128
    words = resp.choices[0].text.split()
    stop_word = words[2]
    cut = await api.completions.create(model="sim", prompt="x", max_tokens=1000, seed=3, stop=[f" {stop_word}"])
    choice = cut.choices[0].model_dump()
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == f" {stop_word}"
    assert stop_word not in cut.choices[0].text.split()[: words.index(stop_word)]


async def test_embeddings_are_deterministic_unit_vectors(sim_factory: SimFactory) -> None:
    async with sim_factory(embedding_dim=64) as sim:
        api = client(sim)
        resp = await api.embeddings.create(model="sim", input=["alpha", "beta"])
        again = await api.embeddings.create(model="sim", input="alpha")
    vecs = [d.embedding for d in resp.data]
    assert [len(v) for v in vecs] == [64, 64]
    assert math.isclose(sum(x * x for x in vecs[0]), 1.0, rel_tol=1e-6)
    assert vecs[0] != vecs[1]
    assert again.data[0].embedding == vecs[0]
    assert resp.usage.prompt_tokens == 3  # "alpha" is 2 tokens of <= 4 chars, "beta" 1


async def test_tokenize(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/tokenize", json={"model": "sim", "prompt": "abcdefgh12"})
        chat = await http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 3
    assert len(body["tokens"]) == 3
    assert body["max_model_len"] == 2048
    assert chat.json()["count"] > 3


async def test_raw_sse_framing(sim: RunningSim) -> None:
    payload = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.content
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chunks[-2]["choices"][0]
    assert last["finish_reason"] == "length"
    assert "stop_reason" in last
    assert chunks[-1]["choices"] == []
    assert all("usage" in c for c in chunks)  # continuous_usage_stats
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
        ({"model": "sim"}, 400),
        ({"model": "sim", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
         400),
        ({"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400),
        ({"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400),
        ({"model": "sim", "messages": [{"role": "user", "content": "x" * 9000}]}, 400),
    ],
)  # fmt: skip
async def test_errors_are_openai_shaped(sim: RunningSim, payload: dict[str, object], status: int) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status


async def test_empty_prompt_is_400(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "", "max_tokens": 2})
    assert r.status_code == 400


async def test_unknown_model_body_matches_vllm(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"model": "X", "prompt": "a"})
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "The model `X` does not exist. Valid aliases: sim.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


async def test_bad_json_and_content_type(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        bad = await http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        text = await http.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
        route = await http.get("/v1/nothing")
    assert bad.status_code == 400
    assert "error" in bad.json()
    assert text.status_code == 400
    assert route.status_code == 404


async def test_api_key(sim_factory: SimFactory) -> None:
    async with sim_factory(api_key="k1") as sim, httpx.AsyncClient(base_url=sim.url) as http:
        denied = await http.get("/v1/models")
        allowed = await http.get("/v1/models", headers={"Authorization": "Bearer k1"})
        health = await http.get("/health")
        metrics = await http.get("/metrics")
    assert denied.status_code == 401
    assert denied.json() == {"error": "Unauthorized"}
    assert allowed.status_code == 200
    assert health.status_code == 200
    assert metrics.status_code == 200


async def test_health_and_metrics(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        health = await http.get("/health")
        await http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        metrics = await http.get("/metrics")
    assert health.status_code == 200
    assert health.content == b""
    assert 'vllm:generation_tokens_total{engine="0",model_name="sim"} 2.0' in metrics.text


async def test_runtime_lora_disabled_by_default(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 404


async def test_load_and_unload_lora(sim_factory: SimFactory) -> None:
    async with sim_factory(allow_runtime_lora=True) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        load = await http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p/new"})
        again = await http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p/new"})
        missing = await http.post("/v1/load_lora_adapter", json={"lora_name": "new"})
        models = (await http.get("/v1/models")).json()
        gen = await http.post("/v1/completions", json={"model": "new", "prompt": "a", "max_tokens": 2})
        unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
        unload_again = await http.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
        after = (await http.get("/v1/models")).json()
    assert load.status_code == 200
    assert load.text == "Success: LoRA adapter 'new' added successfully."
    assert again.status_code == 400
    assert missing.status_code == 400
    assert {m["id"]: m["parent"] for m in models["data"]} == {"sim": None, "new": "sim"}
    assert gen.status_code == 200
    assert unload.status_code == 200
    assert unload.text == "Success: LoRA adapter 'new' removed successfully."
    assert unload_again.status_code == 404
    assert [m["id"] for m in after["data"]] == ["sim"]


async def test_runtime_lora_env(sim_factory: SimFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    async with sim_factory() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 200
