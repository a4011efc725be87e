"""The chunk observer: when the first token is reported, and the timing it reads off real vLLM events."""

from __future__ import annotations

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
