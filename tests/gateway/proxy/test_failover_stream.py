"""The failover stream filter and the continuation request, on real vLLM 0.32 bytes.

vllm_streams/ holds streams captured from the CPU worker (smollm2, temperature 0, max_tokens 4) with and
without `return_token_ids`, with and without `include_usage`: `{route}_ids{flag}_usage{flag}.sse`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.proxy.failover import FailoverPlan, FailoverPolicy, continuation_body, inject_return_token_ids
from gateway.proxy.failover_stream import FailoverStream
from gateway.proxy.usage import count_content_events
from gateway.settings import FailoverSettings

CAPTURES = Path(__file__).parent / "vllm_streams"
_ID = re.compile(rb'"id":"[^"]*","object":"([^"]*)","created":\d+')


def capture(name: str) -> bytes:
    return (CAPTURES / f"{name}.sse").read_bytes()


def normalised(body: bytes) -> bytes:
    """The stream without what differs from one request to the next: its id and creation time."""
    return _ID.sub(rb'"id":"X","object":"\1","created":0', body)


def events(body: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


def payloads(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(event[6:]) for event in events(body) if event.startswith(b"data: {")]


def fed(stream: FailoverStream, chunks: list[bytes]) -> bytes:
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.flush()


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("usage", [False, True])
def test_stripped_stream_is_what_vllm_sends_without_the_flag(route: str, usage: bool) -> None:
    with_ids = capture(f"{route}_idstrue_usage{str(usage).lower()}")
    without = capture(f"{route}_idsfalse_usage{str(usage).lower()}")
    stream = FailoverStream(FailoverPlan(chat=route == "chat", show_usage=usage))
    out = fed(stream, events(with_ids))
    assert normalised(out) == normalised(without)
    assert stream.done
    assert stream.finished
    assert stream.generated == 4
    first = payloads(with_ids)[0]
    prompt = first.get("prompt_token_ids") or first["choices"][0]["prompt_token_ids"]
    generated = [i for p in payloads(with_ids) for c in p["choices"] for i in c.get("token_ids") or []]
    assert stream.token_ids() == prompt + generated
    assert stream.prompt_tokens() == len(prompt)
    if usage:
        assert stream.usage is not None
        assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (len(prompt), 4)


def test_any_chunking_gives_the_same_bytes() -> None:
    body = capture("chat_idstrue_usagetrue")
    whole = fed(FailoverStream(FailoverPlan(chat=True)), [body])
    for size in (1, 7, 100, 333):
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        assert fed(FailoverStream(FailoverPlan(chat=True)), pieces) == whole
    assert b"[DONE]" in whole
    assert b'"usage"' not in whole  # the client did not ask for it


def counted_where_events_end(body: bytes, pieces: list[bytes], separator: bytes = b"\n\n") -> list[int]:
    """Per piece, the content events (count_content_events of each event alone) of the events whose last byte
    is in that piece: when a client has them whole."""
    ends, at = [], 0
    for event in body.split(separator)[:-1]:
        at += len(event) + len(separator)
        ends.append((at, count_content_events(event + separator)))
    counts, offset = [], 0
    for piece in pieces:
        offset += len(piece)
        counts.append(sum(count for end, count in ends if offset - len(piece) < end <= offset))
    return counts


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_content_events_are_counted_when_each_event_is_whole(route: str) -> None:
    """The stream searches an event of its backend only after the head all its events share: the counts
    (TTFT and inter-token gaps come from them) are those of count_content_events on each whole event, in the
    chunk that completes it, however the body is cut (a match cut in two is one, half an event none), with
    reasoning (both of vLLM's spellings), an escaped key in a text, empty deltas and several events in one
    chunk."""
    first, *rest = events(capture(f"{route}_idstrue_usagetrue"))
    content = rest[0]
    field = b'"delta":{"content":' if route == "chat" else b'"text":'
    extra = [
        content.replace(field, b'"delta":{"reasoning_content":' if route == "chat" else b'"text": '),
        content.replace(field, b'"delta":{"reasoning":' if route == "chat" else b'"text":  '),
        content.replace(field + b'"', field + b'"x\\"content\\":\\"y '),  # a key, escaped, in the text
        content.replace(field + b'"', field + b'""'),  # empty
    ]
    body = b"".join([first, *extra, *rest])
    assert count_content_events(body) == 4 + 4 - 1  # the empty delta is no token
    cuts = (
        events(body),
        [body],
        [body[i : i + 50] for i in range(0, len(body), 50)],
        [body[i : i + 7] for i in range(0, len(body), 7)],
        [first + extra[0], b"".join(extra[1:] + rest)],
    )
    for pieces in cuts:
        stream = FailoverStream(FailoverPlan(chat=route == "chat", show_usage=True))
        counted = []
        for piece in pieces:
            stream.feed(piece)
            counted.append(stream.content_events)
        assert counted == counted_where_events_end(body, pieces)
        assert sum(counted) == count_content_events(body)
    # a match cut after its opening quote, the text's first byte in the next read: counted once, with its
    # event's end (searching each read alone would miss it)
    cut = body.index(field) + len(field) + 1
    pieces = [body[:cut], body[cut:]]
    assert sum(map(count_content_events, pieces)) == 6
    stream = FailoverStream(FailoverPlan(chat=route == "chat", show_usage=True))
    counted = [(stream.feed(piece), stream.content_events)[1] for piece in pieces]
    assert counted == counted_where_events_end(body, pieces)
    assert sum(counted) == 7


def test_crlf_events_are_cut_where_the_server_cuts_them() -> None:
    """A server that ends its lines with CRLF (as the SSE format allows): its events pass one by one, ids
    stripped and counted, as vLLM's do."""
    lf = capture("chat_idstrue_usagetrue")
    crlf = lf.replace(b"\n", b"\r\n")
    pieces = [crlf[i : i + 90] for i in range(0, len(crlf), 90)]
    stream = FailoverStream(FailoverPlan(chat=True))
    out, counted = [], []
    for piece in pieces:
        out.append(stream.feed(piece))
        counted.append(stream.content_events)
    whole = b"".join(out) + stream.flush()
    assert whole.replace(b"\r\n", b"\n") == fed(FailoverStream(FailoverPlan(chat=True)), events(lf))
    assert counted == counted_where_events_end(crlf, pieces, b"\r\n\r\n")
    assert stream.done
    assert stream.generated == 4
    assert stream.token_ids() == fed_ids(lf)
    # an event goes out as soon as it is whole, not at the end of the stream
    first = crlf.index(b"\r\n\r\n") + 4
    assert FailoverStream(FailoverPlan(chat=True)).feed(crlf[: first + 10]).endswith(b"\r\n\r\n")


def fed_ids(body: bytes) -> list[int]:
    stream = FailoverStream(FailoverPlan(chat=True))
    fed(stream, events(body))
    return stream.token_ids()


def test_a_head_not_learned_still_counts_as_started_and_ids_are_stripped() -> None:
    """Events that put their choices before the head (llama.cpp's server does): the head cannot be read off
    their start, so the stream cannot be continued; but once an event reached the client the stream has
    started (a failover must not send the request again) and no event carries the ids the client did not
    ask for."""

    def event(delta: bytes, extra: bytes = b"") -> bytes:
        return (
            b'data: {"choices":[{"index":0,"delta":%s,"finish_reason":null,"token_ids":[9,10]}],"created":1,'
            b'"id":"chatcmpl-A","model":"m","object":"chat.completion.chunk"%s}\n\n' % (delta, extra)
        )

    stream = FailoverStream(FailoverPlan(chat=True))
    out = stream.feed(event(b'{"role":"assistant","content":""}', b',"prompt_token_ids":[1,2]'))
    out += stream.feed(event(b'{"content":"One"}'))
    assert stream.started
    assert stream.refusal() == "unknown stream head"
    assert b'token_ids":[' not in out
    assert [payload["choices"][0]["token_ids"] for payload in payloads(out)] == [None, None]
    assert payloads(out)[0]["prompt_token_ids"] is None
    assert stream.content_events == 1

    # a head without one of the fields a continuation needs
    stream = FailoverStream(FailoverPlan(chat=True))
    stream.feed(b'data: {"id":"x","created":1,"choices":[{"index":0,"delta":{"content":"a"},"token_ids":[3]}]}\n\n')
    assert stream.started
    assert stream.refusal() == "unknown stream head"


def test_client_that_asked_for_ids_keeps_them() -> None:
    body = capture("completions_idstrue_usagetrue")
    stream = FailoverStream(FailoverPlan(keep_ids=True, show_usage=True))
    assert fed(stream, events(body)) == body


def test_error_event_after_content_is_a_failure_before_content_is_not() -> None:
    error = capture("chat_engine_killed").split(b"\n\n")[-3] + b"\n\n"
    assert error.startswith(b'data: {"error": ')
    first, *content = events(capture("chat_idstrue_usagefalse"))
    stream = FailoverStream(FailoverPlan(chat=True))
    assert stream.feed(first + error) == first.replace(first[first.index(b'"prompt_token_ids":') :], b"") + (
        b'"prompt_token_ids":null,"prompt_text":null}\n\n' + error
    )
    assert stream.failure is None  # only the role chunk went out: the request's own error, passed on

    stream = FailoverStream(FailoverPlan(chat=True))
    sent = stream.feed(first + content[0] + error + b"data: [DONE]\n\n")
    assert stream.failure is not None
    assert stream.failure.event == error
    assert b"error" not in sent
    assert b"[DONE]" not in sent
    assert stream.generated == 1
    assert stream.refusal() is None


def test_chat_continuation_from_completions_events() -> None:
    chat = events(capture("chat_idstrue_usagetrue"))
    stream = FailoverStream(FailoverPlan(chat=True, show_usage=True))
    sent = stream.feed(b"".join(chat[:3]))  # role chunk and two tokens, then the backend dies
    head = payloads(sent)[0]
    prompt_tokens = stream.prompt_tokens()
    stream.continue_from_here(translate=True)
    # what /v1/completions answers to the continuation: its own id, its prompt's ids, its own usage
    continuation = (
        b'data: {"id":"cmpl-other","object":"text_completion","created":5,"model":"smollm2","choices":[{"index":0,'
        b'"text":" is","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[1,2,3],'
        b'"token_ids":[314]}]}\n\n'
        b'data: {"id":"cmpl-other","object":"text_completion","created":5,"model":"smollm2","choices":[{"index":0,'
        b'"text":" a","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,'
        b'"token_ids":[253]}]}\n\n'
        b'data: {"id":"cmpl-other","object":"text_completion","created":5,"model":"smollm2","choices":[],"usage":'
        b'{"prompt_tokens":36,"total_tokens":38,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0}}}'
        b"\n\ndata: [DONE]\n\n"
    )
    out = stream.feed(continuation)
    parts = payloads(out)
    assert [(p["id"], p["object"], p["created"], p["model"]) for p in parts] == [
        (head["id"], "chat.completion.chunk", head["created"], "smollm2")
    ] * 3
    assert parts[0]["choices"] == [
        {"index": 0, "delta": {"content": " is"}, "logprobs": None, "finish_reason": None, "token_ids": None}
    ]
    assert parts[1]["choices"][0]["finish_reason"] == "length"
    assert parts[1]["choices"][0]["stop_reason"] is None
    assert parts[2]["usage"] == {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + 4,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
    }
    assert out.endswith(b"data: [DONE]\n\n")
    assert stream.done
    assert stream.finished
    assert stream.generated == 4


def test_completions_continuation_keeps_one_prompt_ids_and_drops_hidden_usage() -> None:
    original = events(capture("completions_idstrue_usagetrue"))
    stream = FailoverStream(FailoverPlan())
    stream.feed(original[0])
    stream.continue_from_here(translate=False)
    rest = b"".join(original[1:]).replace(b'"prompt_token_ids":null', b'"prompt_token_ids":[9,9]', 1)
    out = stream.feed(rest)
    assert b"[9,9]" not in out
    assert b'"usage"' not in out
    assert b'"token_ids":[' not in out
    assert stream.usage is not None
    assert stream.usage.completion_tokens == 1 + 4


def test_ending_of_a_stream_whose_finish_went_out() -> None:
    body = events(capture("completions_idstrue_usagetrue"))
    stream = FailoverStream(FailoverPlan(show_usage=True))
    stream.feed(b"".join(body[:4]))  # four tokens, the last with finish_reason, then nothing
    assert stream.finished
    assert not stream.done
    ending = stream.ending()
    assert payloads(ending)[0]["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    assert ending.endswith(b"data: [DONE]\n\n")


def test_without_token_ids_the_stream_cannot_be_continued() -> None:
    stream = FailoverStream(FailoverPlan(chat=True))
    stream.feed(capture("chat_idsfalse_usagefalse").split(b"data: [DONE]")[0])
    assert stream.refusal() == "no token ids"
    fresh = FailoverStream(FailoverPlan(chat=True))
    assert fresh.refusal() is None
    assert not fresh.started


def plan(payload: dict[str, Any], route: str = "/v1/chat/completions", headers: dict[str, str] | None = None) -> Any:
    scope = {"headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}
    return FailoverPolicy(FailoverSettings()).plan(route, payload, scope)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize(
    ("extra", "refusal"),
    [
        ({}, None),
        ({"n": 2}, "several choices"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": False}, None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, None),
        ({"response_format": {"type": "json_object"}}, "constrained decoding"),
        ({"presence_penalty": 0.5}, "presence or frequency penalty"),
        ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "continuous usage stats"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "multimodal content",
        ),
    ],
)
def test_which_chat_streams_can_be_continued(extra: dict[str, Any], refusal: str | None) -> None:
    assert plan({**CHAT, **extra}).refusal == refusal


def test_plan_is_only_for_streams_that_did_not_opt_out() -> None:
    assert plan({**CHAT, "stream": False}) is None
    assert plan({"model": "m", "input": "x", "stream": True}, "/v1/embeddings") is None
    assert plan(CHAT, headers={"x-switchyard-failover": "off"}) is None
    assert plan(CHAT, headers={"x-switchyard-failover": "on"}) is not None
    assert FailoverPolicy(FailoverSettings(enabled=False)).plan("/v1/chat/completions", CHAT, {"headers": []}) is None
    completion = plan({"model": "m", "prompt": ["a", "b"], "stream": True}, "/v1/completions")
    assert completion.refusal == "several prompts"
    asked = plan({**CHAT, "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert (asked.keep_ids, asked.show_usage, asked.chat) == (True, True, True)


def test_continuation_body_of_a_chat() -> None:
    payload = {**CHAT, "max_completion_tokens": 10, "min_tokens": 3, "temperature": 0, "logprobs": False, "seed": 1}
    body = continuation_body(payload, True, [1, 2, 3, 40, 41], 2, None)
    assert body is not None
    assert orjson.loads(body) == {
        "model": "m",
        "stream": True,
        "min_tokens": 1,
        "temperature": 0,
        "seed": 1,
        "max_tokens": 8,
        "prompt": [1, 2, 3, 40, 41],
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    # no max_tokens: what chat would have allowed, from the backend's context length
    unbounded = continuation_body(CHAT, True, [1, 2, 3, 40, 41], 2, 100)
    assert unbounded is not None
    assert orjson.loads(unbounded)["max_tokens"] == 100 - 5
    assert continuation_body(CHAT, True, [1, 2, 3], 0, None) is None  # /v1/completions would stop at 16
    assert continuation_body({**CHAT, "max_tokens": 2}, True, [1, 2, 3], 2, None) is None  # nothing left


def test_continuation_body_of_a_completion() -> None:
    payload = {"model": "m", "prompt": "The sea is", "stream": True, "max_tokens": 4, "truncate_prompt_tokens": 3,
               "stream_options": {"include_usage": False}}  # fmt: skip
    body = continuation_body(payload, False, [504, 3426, 314, 253], 1, None)
    assert body is not None
    assert orjson.loads(body) == {
        "model": "m",
        "prompt": [504, 3426, 314, 253],
        "stream": True,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    assert orjson.loads(inject_return_token_ids(b'{"model": "m", "return_token_ids": false} \n')) == {
        "model": "m",
        "return_token_ids": True,
    }


def test_reasoning_in_progress_is_not_continued() -> None:
    first, content, *_ = events(capture("chat_idstrue_usagefalse"))
    reasoning = content.replace(b'"delta":{"content":', b'"delta":{"reasoning_content":')
    stream = FailoverStream(FailoverPlan(chat=True))
    stream.feed(first + content + reasoning)
    assert stream.refusal() == "reasoning in progress"  # its text is not the message's content
    stream.feed(content)
    assert stream.refusal() is None


def test_usage_that_went_out_is_not_sent_twice() -> None:
    *body, done = events(capture("completions_idstrue_usagetrue"))
    stream = FailoverStream(FailoverPlan(show_usage=True))
    sent = stream.feed(b"".join(body))  # everything but [DONE]
    assert b'"usage"' in sent
    assert stream.finished
    assert stream.ending() == done
