"""What mid-stream failover relies on: a continuation (prompt + the first k generated tokens, as token ids on
/v1/completions or as the partial assistant message with continue_final_message on chat) produces exactly what
the uninterrupted request produced from token k on; `--positional-output` makes that visible in the text."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.worker.sim.conftest import RunningSim, SimFactory
from worker.sim.text import EOS_ID

QUESTION = [{"role": "user", "content": "Tell me about prefix caching."}]


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def stream_chunks(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = await http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = r.content.split(b"\n\n")[:-1]
    assert events[-1] == b"data: [DONE]"
    return [orjson.loads(e[len(b"data: ") :]) for e in events[:-1]]


def ks(n: int) -> list[int]:
    return sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1})


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 42}])
async def test_completion_continues_from_token_ids(sim: RunningSim, sampling: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        whole = await post(http, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300,
                                                     "return_token_ids": True, **sampling})  # fmt: skip
        ref = whole["choices"][0]
        ids, prompt = ref["token_ids"], ref["prompt_token_ids"]
        assert ref["finish_reason"] == "stop"
        assert ids[-1] == EOS_ID  # a natural end: EOS is generated and counted
        assert whole["usage"]["completion_tokens"] == len(ids)
        for k in ks(len(ids)):
            cont = await post(http, "/v1/completions", {"prompt": prompt + ids[:k], "max_tokens": 300 - k,
                                                        "return_token_ids": True, **sampling})  # fmt: skip
            got = cont["choices"][0]
            assert got["token_ids"] == ids[k:], k
            assert ref["text"].endswith(got["text"])
            assert len(ref["text"]) - len(got["text"]) == 4 * k  # every answer token is 4 characters
            assert got["finish_reason"] == "stop"


async def test_length_limited_continuation(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        ref = (
            await post(
                http,
                "/v1/completions",
                {"prompt": "Count", "max_tokens": 20, "ignore_eos": True, "temperature": 0, "return_token_ids": True},
            )
        )["choices"][0]
        got = (await post(http, "/v1/completions", {"prompt": ref["prompt_token_ids"] + ref["token_ids"][:7],
                                                    "max_tokens": 13, "ignore_eos": True, "temperature": 0,
                                                    "return_token_ids": True}))["choices"][0]  # fmt: skip
    assert got["token_ids"] == ref["token_ids"][7:]
    assert got["finish_reason"] == ref["finish_reason"] == "length"


async def test_chat_continues_the_partial_assistant_message(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        chunks = await stream_chunks(
            http,
            "/v1/chat/completions",
            {"messages": QUESTION, "max_tokens": 200, "temperature": 0, "return_token_ids": True},
        )
        prompt = chunks[0]["prompt_token_ids"]
        deltas = [(c["choices"][0]["delta"]["content"], c["choices"][0]["token_ids"]) for c in chunks[1:]]
        ids = [t for _, ts in deltas for t in ts]
        for k in ks(len(ids)):
            partial = "".join(text for text, _ in deltas[:k])  # what a client had received
            body = {"messages": [*QUESTION, {"role": "assistant", "content": partial}], "max_tokens": 200 - k,
                    "temperature": 0, "return_token_ids": True, "continue_final_message": True,
                    "add_generation_prompt": False}  # fmt: skip
            cont = await post(http, "/v1/chat/completions", body)
            assert cont["prompt_token_ids"] == prompt + ids[:k], k  # the text went back to the very same ids
            assert cont["choices"][0]["token_ids"] == ids[k:], k
            assert cont["choices"][0]["message"] == {**cont["choices"][0]["message"], "role": "assistant",
                                                     "content": "".join(t for t, _ in deltas[k:])}  # fmt: skip
            tokenized = await post(http, "/tokenize", {"messages": body["messages"], "add_generation_prompt": False,
                                                       "continue_final_message": True})  # fmt: skip
            assert tokenized["tokens"] == prompt + ids[:k]


async def test_positional_output_numbers_the_whole_answer(sim_factory: SimFactory) -> None:
    async with sim_factory(positional_output=True) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        chunks = await stream_chunks(http, "/v1/completions", {"prompt": "go", "max_tokens": 30, "ignore_eos": True,
                                                               "return_token_ids": True})  # fmt: skip
        texts = [c["choices"][0]["text"] for c in chunks]
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        prompt = chunks[0]["choices"][0]["prompt_token_ids"]
        resumed = await post(http, "/v1/completions", {"prompt": prompt + ids[:12], "max_tokens": 18,
                                                       "ignore_eos": True})  # fmt: skip
        duplicated = await post(http, "/v1/completions", {"prompt": prompt + ids[:12] + ids[11:12], "max_tokens": 3,
                                                          "ignore_eos": True})  # fmt: skip
        chat = await post(http, "/v1/chat/completions", {
            "messages": [*QUESTION, {"role": "assistant", "content": "".join(texts[:5])}], "max_tokens": 4,
            "ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False})  # fmt: skip
        fresh_chat = await post(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 3,
                                                               "ignore_eos": True})  # fmt: skip
    assert texts[:3] == ["   0", "   1", "   2"]
    assert [int(t) for t in texts] == list(range(30))
    assert [int(t) for t in resumed["choices"][0]["text"].split()] == list(range(12, 30))
    # a continuation that resent one token too many shows it: the numbering skips
    assert [int(t) for t in duplicated["choices"][0]["text"].split()] == [13, 14, 15]
    assert [int(t) for t in chat["choices"][0]["message"]["content"].split()] == [5, 6, 7, 8]
    assert fresh_chat["choices"][0]["message"]["content"] == "   0   1   2"


async def test_positional_output_has_natural_stops(sim_factory: SimFactory) -> None:
    async with sim_factory(positional_output=True) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        out = await post(http, "/v1/completions", {"prompt": "until it stops", "max_tokens": 500, "seed": 3,
                                                   "return_token_ids": True})  # fmt: skip
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert 8 <= len(choice["token_ids"]) <= 128
    assert [int(t) for t in choice["text"].split()] == list(range(len(choice["token_ids"]) - 1))


def test_positional_output_needs_a_bounded_context() -> None:
    from worker.sim.config import ConfigError, SimConfig

    with pytest.raises(ConfigError, match="max_model_len"):
        SimConfig(positional_output=True, max_model_len=20_000, num_gpu_blocks=2_000)


async def test_continue_final_message_errors_mirror_vllm(sim: RunningSim) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": "Well,"}]
    async with httpx.AsyncClient(base_url=sim.url) as http:
        both = await http.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True,
                                                              "add_generation_prompt": True})  # fmt: skip
        default = await http.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True})
        tokenize = await http.post("/tokenize", json={"messages": messages, "continue_final_message": True})
    assert both.json() == {"error": {"message": "Cannot set both `continue_final_message` and "
                                     "`add_generation_prompt` to True.", "type": "BadRequestError", "param": None,
                                     "code": 400}}  # fmt: skip
    assert default.status_code == tokenize.status_code == 400
    assert default.json()["error"]["message"].startswith("continue_final_message and add_generation_prompt are not "
                                                         "compatible. Use continue_final_message when")  # fmt: skip


async def test_add_generation_prompt_false_renders_no_assistant_header(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        with_header = await post(http, "/tokenize", {"messages": QUESTION, "return_token_strs": True})
        without = await post(http, "/tokenize", {"messages": QUESTION, "add_generation_prompt": False,
                                                 "return_token_strs": True})  # fmt: skip
        answer = await post(http, "/v1/chat/completions", {"messages": QUESTION, "add_generation_prompt": False,
                                                            "max_tokens": 2, "return_token_ids": True})  # fmt: skip
    assert "".join(with_header["token_strs"]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "".join(without["token_strs"]).endswith("<|im_end|>\n")
    assert answer["prompt_token_ids"] == without["tokens"]
    assert answer["choices"][0]["message"]["role"] == "user"


async def test_out_of_vocabulary_prompt_ids_are_400(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"prompt": [5, 99_999_999], "max_tokens": 1})
        neg = await http.post("/v1/completions", json={"prompt": [-1, 5], "max_tokens": 1})
    assert r.json() == {"error": {"message": "Token id 99999999 is out of vocabulary", "type": "BadRequestError",
                                  "param": None, "code": 400}}  # fmt: skip
    assert neg.json()["error"]["message"] == "Token id -1 is out of vocabulary"


async def test_stream_chunks_have_vllm_032_keys(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        chat = await stream_chunks(http, "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 3,
                                                                  "ignore_eos": True})  # fmt: skip
        chat_ids = await stream_chunks(
            http,
            "/v1/chat/completions",
            {
                "messages": QUESTION,
                "max_tokens": 3,
                "ignore_eos": True,
                "return_token_ids": True,
                "stream_options": {"include_usage": True},
            },
        )
        done = await stream_chunks(http, "/v1/completions", {"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert list(chat[0]) == ["id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"]
    assert chat[0]["prompt_token_ids"] is None
    assert list(chat[1]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    assert list(chat[-1]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "stop_reason",
                                            "token_ids"]  # fmt: skip
    assert chat[-1]["system_fingerprint"].startswith("vllm-")  # the last chunk, when no usage chunk follows
    assert "system_fingerprint" not in chat_ids[-2]
    assert list(chat_ids[-1]) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in chat_ids[1:-1])  # one id a chunk
    assert list(done[0]["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                           "prompt_token_ids", "token_ids"]  # fmt: skip
