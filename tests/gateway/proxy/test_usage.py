from __future__ import annotations

import json

import pytest

from gateway.proxy.usage import (
    UsageChunkFilter,
    UsageTail,
    count_content_events,
    inject_include_usage,
    parse_usage,
    wants_usage_injection,
)

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_parse_usage_takes_the_last_report() -> None:
    body = b'{"usage":{"prompt_tokens":1,"completion_tokens":1}} {"usage":{"prompt_tokens":7,"completion_tokens":2}}'
    usage = parse_usage(body)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 2)


def test_parse_usage_embeddings_has_no_completion_tokens() -> None:
    usage = parse_usage(b'{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}')
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 0)


@pytest.mark.parametrize("body", [b'{"usage":null}', b'{"usage": null}', b'{"choices":[]}', b""])
def test_parse_usage_absent(body: bytes) -> None:
    assert parse_usage(body) is None


def test_content_events_ignore_the_empty_role_chunk() -> None:
    assert count_content_events(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n') == 0
    assert count_content_events(CHUNK + USAGE + CHUNK + DONE) == 2
    assert count_content_events(b'data: {"choices":[{"text":" once","index":0}]}\n\n') == 1


@pytest.mark.parametrize(
    ("route", "payload", "expected"),
    [
        ("/v1/chat/completions", {"stream": True}, True),
        ("/v1/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}}, True),
        ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}, False),
        ("/v1/chat/completions", {"stream": False}, False),
        ("/v1/embeddings", {"stream": True}, False),
        ("/v1/chat/completions", {"stream": True, "stream_options": "bad"}, False),  # vLLM answers the 400
        # booleans as vLLM's pydantic models read them: a stream that asked for no usage in other words
        ("/v1/chat/completions", {"stream": 1}, True),
        ("/v1/completions", {"stream": "yes", "stream_options": {"include_usage": "false"}}, True),
        ("/v1/chat/completions", {"stream": "true", "stream_options": {"include_usage": 0}}, True),
        ("/v1/chat/completions", {"stream": "on", "stream_options": {"include_usage": "t"}}, False),
        ("/v1/chat/completions", {"stream": 0}, False),
        ("/v1/chat/completions", {"stream": "maybe"}, False),  # vLLM answers the 400
    ],
)
def test_wants_usage_injection(route: str, payload: dict[str, object], expected: bool) -> None:
    assert wants_usage_injection(route, payload) is expected


def test_inject_keeps_bytes_and_overrides_stream_options() -> None:
    body = b'{"model": "m", "stream": true, "stream_options": {"continuous_usage_stats": true, "x": 1}}  \n'
    injected = inject_include_usage(body, json.loads(body))
    assert injected.startswith(body.rstrip()[:-1])
    # vLLM sends usage in every chunk only with include_usage: the client asked for none, and gets none
    expected = {"continuous_usage_stats": False, "x": 1, "include_usage": True}
    assert json.loads(injected)["stream_options"] == expected


def test_filter_removes_only_the_usage_event_across_odd_chunking() -> None:
    stream = CHUNK + CHUNK + USAGE + DONE
    for size in (1, 7, 50, len(stream)):
        usage_filter = UsageChunkFilter()
        out = b"".join(usage_filter.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        out += usage_filter.flush()
        assert out == CHUNK + CHUNK + DONE
        assert usage_filter.usage is not None
        assert usage_filter.usage.prompt_tokens == 12


def test_filter_keeps_continuous_usage_on_content_chunks() -> None:
    with_usage = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    usage_filter = UsageChunkFilter()
    assert usage_filter.feed(with_usage + USAGE + DONE) == with_usage + DONE


def test_tail_finds_usage_at_the_end_of_a_long_body() -> None:
    tail = UsageTail()
    tail.feed(b"x" * 10_000)
    tail.feed(b'...,"usage":{"prompt_tokens":3,"completion_tokens":4}}')
    usage = tail.usage()
    assert usage is not None
    assert usage.completion_tokens == 4


def test_tail_keeps_the_last_bytes_however_the_body_is_cut() -> None:
    body = b"x" * 9_000 + b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}' + b" " * 300
    for size in (1, 7, 100, 4095, 4096, 5000, len(body)):
        tail = UsageTail()
        for start in range(0, len(body), size):
            tail.feed(body[start : start + size])
        assert tail.tail == body[-4096:]
        usage = tail.usage()
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
    short = UsageTail()
    short.feed(b"ab")
    short.feed(b"c")
    assert short.tail == b"abc"


def test_parse_usage_of_a_responses_api_answer() -> None:
    """vLLM's Responses API names them input and output tokens; its stream's last event holds them, after
    the output, and earlier events carry `"usage":null`."""
    completed = (
        b'event: response.completed\ndata: {"response":{"id":"resp_1","output":[{"type":"message","content":'
        b'[{"type":"output_text","text":"Hi"}]}],"status":"completed","usage":{"input_tokens":12,'
        b'"input_tokens_details":{"cached_tokens":8},"output_tokens":3,"output_tokens_details":'
        b'{"reasoning_tokens":0},"total_tokens":15},"user":null},"sequence_number":9,"type":"response.completed"}\n\n'
    )
    created = b'event: response.created\ndata: {"response":{"id":"resp_1","usage":null},"type":"x"}\n\n'
    usage = parse_usage(created + completed)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (12, 3, 8)
    assert parse_usage(created) is None
