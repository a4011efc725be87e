"""The chunk observer: when the first token is reported, and the timing it reads off real vLLM events."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter

from gateway.loop_series import HistogramChild
from gateway.proxy.failover import FailoverPlan
from gateway.proxy.failover_stream import FailoverStream
from gateway.proxy.stream_observer import ChunkObserver
from gateway.proxy.usage import UsageChunkFilter
from tests.gateway.proxy.test_failover_stream import capture, events

BOUNDS = (0.1, float("inf"))


def observed(
    stream_filter: FailoverStream | UsageChunkFilter | None,
) -> tuple[ChunkObserver, list[int], HistogramChild]:
    itl = HistogramChild(BOUNDS)
    calls: list[int] = []
    observer = ChunkObserver(True, stream_filter, perf_counter(), itl, lambda: calls.append(1))
    return observer, calls, itl


def test_first_token_is_reported_once_at_the_first_content_event() -> None:
    for stream_filter in (None, UsageChunkFilter(), FailoverStream(FailoverPlan(chat=True))):
        observer, calls, itl = observed(stream_filter)
        role, *content = events(capture("chat_idstrue_usagetrue"))
        observer.feed(role)  # the role chunk's content is empty: no token yet
        assert (calls, observer.ttft) == ([], None)
        for event in content:
            observer.feed(event)
        assert calls == [1]
        assert observer.ttft is not None
        assert sum(itl.counts) == 3  # 4 tokens: 3 gaps
        assert observer.done


def test_a_continuation_reports_its_own_first_token() -> None:
    observer, calls, itl = observed(FailoverStream(FailoverPlan(chat=True)))
    role, first, second, *_ = events(capture("chat_idstrue_usagefalse"))
    observer.feed(role + first)
    observer.await_first_token()
    observer.feed(b": keep-alive comment\n\n")
    assert calls == [1]  # no content yet
    observer.feed(second)
    assert calls == [1, 1]
    assert sum(itl.counts) == 1  # the gap between the two tokens, across the parts


def test_tokens_that_arrive_together_have_no_gap_between_them() -> None:
    observer, _, itl = observed(None)
    role, *content = events(capture("completions_idsfalse_usagefalse"))
    observer.feed(role + b"".join(content))
    tokens = sum(event.count(b'"text":"') - event.count(b'"text":""') for event in [role, *content])
    assert sum(itl.counts) == tokens - 1
    assert itl.counts[0] == tokens - 1  # all in the first bucket
    assert itl.sum == 0.0


def test_an_event_is_counted_when_it_is_whole_whoever_cuts_it() -> None:
    """A token whose event is cut between two reads is counted once, when its end comes; half an event (of a
    backend that then fails) is no token: with each filter and without one."""
    body = b"".join(events(capture("chat_idstrue_usagetrue")))
    cut = body.index(b'"content":"The"') + len(b'"content":"')  # the first token, cut after its quote
    filters: tuple[Callable[[], FailoverStream | UsageChunkFilter | None], ...] = (
        lambda: None,
        UsageChunkFilter,
        lambda: FailoverStream(FailoverPlan(chat=True)),
    )
    for make in filters:
        observer, calls, itl = observed(make())
        observer.feed(body[:cut])
        assert (calls, observer.ttft) == ([], None)
        observer.feed(body[cut:])
        assert calls == [1]
        assert sum(itl.counts) == 3
        assert observer.done

        observer, calls, _ = observed(make())
        observer.feed(body[:cut] + b'x", "truncated by a dying backend')
        assert (calls, observer.ttft) == ([], None)


def test_reasoning_and_tool_call_deltas_are_tokens() -> None:
    """vLLM 0.32's reasoning deltas (`reasoning`) and a tool call's name and arguments come before any
    content: the first of them is the first token."""
    head = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    deltas = [
        b'"delta":{"role":"assistant","content":""}',
        b'"delta":{"reasoning":"Let"}',
        b'"delta":{"reasoning":" me"}',
        b'"delta":{"tool_calls":[{"id":"call_1","type":"function","index":0,"function":{"name":"weather"}}]}',
        b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\""}}]}',
    ]
    observer, calls, itl = observed(None)
    observer.feed(head + deltas[0] + b"}]}\n\n")
    assert calls == []
    for delta in deltas[1:]:
        observer.feed(head + delta + b',"finish_reason":null}]}\n\n')
    assert calls == [1]
    assert sum(itl.counts) == 3


def test_crlf_streams_are_timed_and_their_end_is_seen() -> None:
    body = b"".join(events(capture("chat_idsfalse_usagefalse"))).replace(b"\n", b"\r\n")
    for stream_filter in (None, UsageChunkFilter()):
        observer, calls, itl = observed(stream_filter)
        out = b"".join(observer.feed(body[i : i + 64]) for i in range(0, len(body), 64)) + observer.flush()
        assert out == body
        assert calls == [1]
        assert sum(itl.counts) == 3
        assert observer.done


def responses_event(kind: str, data: bytes) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)


def test_a_responses_stream_is_timed_by_its_deltas_and_ends_with_its_last_event() -> None:
    """The Responses API streams typed events and no [DONE]: its tokens are its deltas (the `.done` events
    repeat the text), and its end is response.completed (or incomplete, or failed)."""
    stream = [
        responses_event("response.created", b'{"response":{"id":"resp_1","status":"in_progress"},"type":"x"}'),
        responses_event("response.output_text.delta", b'{"delta":"Hel","type":"response.output_text.delta"}'),
        responses_event("response.output_text.delta", b'{"delta":"lo","type":"response.output_text.delta"}'),
        responses_event("response.output_text.done", b'{"text":"Hello","type":"response.output_text.done"}'),
        responses_event("response.content_part.done", b'{"part":{"text":"Hello"},"type":"x"}'),
    ]
    completed = responses_event("response.completed", b'{"response":{"output":[{"text":"Hello"}]},"type":"x"}')
    itl = HistogramChild(BOUNDS)
    calls: list[int] = []
    observer = ChunkObserver(True, None, perf_counter(), itl, lambda: calls.append(1), responses=True)
    for event in stream:
        observer.feed(event)
    assert calls == [1]
    assert sum(itl.counts) == 1  # two deltas: one gap
    assert not observer.done  # the client hanging up now would not have had it all
    observer.feed(completed[:20])
    assert not observer.done
    observer.feed(completed[20:])
    assert observer.done
    assert sum(itl.counts) == 1
