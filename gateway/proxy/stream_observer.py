"""Per-response bookkeeping on the chunks that pass through: time to first token, inter-token gaps,
usage, and what the client was last sent. The bytes are only looked at, unless a filter rewrites them: the
usage-only event the gateway itself asked for is removed (UsageChunkFilter), a failover-capable stream is
kept one stream over its backends (FailoverStream)."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Protocol

from gateway.loop_series import HistogramChild
from gateway.proxy.sse import ENDS, RESPONSES_END, whole_events
from gateway.proxy.usage import CONTENT_EVENT, RESPONSES_CONTENT_EVENT, Usage, UsageTail


class StreamFilter(Protocol):
    """Rewrites an SSE body on its way to the client, in whole events; holds the usage it saw, and counts the
    content events (as CONTENT_EVENT finds them) of the events each chunk completes (`content_events`)."""

    usage: Usage | None
    content_events: int

    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class ChunkObserver:
    """Observes each chunk on its way; `first_token` is called when the first content event passes.

    `feed` runs for every token of every stream the gateway relays: it is written for that (one call, no
    helper frames, the content events counted by one regex pass, the filter's when there is one). Content is
    counted in whole events only, when their end arrives: a match cut between two reads is still one, and
    half an event (of a backend that failed) is none. `responses`: a Responses API stream, whose tokens are
    its deltas and whose end is its last event (it has no [DONE])."""

    def __init__(
        self,
        is_sse: bool,
        stream_filter: StreamFilter | None,
        started: float,
        itl: HistogramChild,
        first_token: Callable[[], None] = lambda: None,
        responses: bool = False,
    ) -> None:
        self.ttft: float | None = None
        self.content_events = 0  # events with generated content sent to the client so far
        self.last_sent = b"\n\n"  # the last bytes sent: does an injected event need a separator first?
        self.sse = is_sse
        self._started = started
        self._itl = itl
        self._first_token = first_token
        self._awaiting = is_sse  # first_token is still to be called
        self._last_token_at = 0.0
        self._tail = UsageTail()
        self._filter = stream_filter if is_sse else None
        self._count = (RESPONSES_CONTENT_EVENT if responses else CONTENT_EVENT).findall
        self._responses = responses
        self._ended = False  # a Responses API stream's last event went out
        self._held: list[bytes] = []  # without a filter: the start of an event whose end has not come yet
        self._sep: bytes | None = None  # without a filter: the stream's event separator, once one ended

    def feed(self, chunk: bytes) -> bytes:
        """Observe an upstream chunk; return the bytes to send the client (possibly none)."""
        stream_filter = self._filter
        if stream_filter is None:  # a filter reads the usage itself
            self._tail.feed(chunk)
            if not self.sse:
                return chunk
            sep = self._sep
            if sep is not None and not self._held and chunk.endswith(sep):  # whole events, the usual case
                tokens = len(self._count(chunk))
                if self._responses and RESPONSES_END.search(chunk):
                    self._ended = True
            else:
                tokens = self._count_whole_events(chunk)
        else:
            chunk = stream_filter.feed(chunk)
            tokens = stream_filter.content_events
        if tokens:
            now = perf_counter()
            if self.ttft is not None:
                self._itl.observe(now - self._last_token_at)
            else:
                self.ttft = now - self._started
            if self._awaiting:
                self._awaiting = False
                self._first_token()
            if tokens > 1:
                for _ in range(tokens - 1):  # events that arrived together came with no gap between them
                    self._itl.observe(0.0)
            self._last_token_at = now
            self.content_events += tokens
        if chunk:
            self.last_sent = chunk
        return chunk

    def _count_whole_events(self, chunk: bytes) -> int:
        """The content events that `chunk` completes, with what came before it of the first one."""
        whole = whole_events(self._held, chunk, self._sep)
        if whole is None:
            return 0
        data, self._sep, end = whole
        if self._responses and RESPONSES_END.search(data, 0, end):
            self._ended = True
        return len(self._count(data, 0, end))

    def await_first_token(self) -> None:
        """Call `first_token` again at the next content event (that of a continuation on another backend)."""
        self._awaiting = self.sse

    def flush(self) -> bytes:
        """Bytes held back (an unfinished event) when the upstream ends."""
        rest = self._filter.flush() if self._filter is not None else b""
        if rest:
            self.last_sent = rest
        return rest

    @property
    def done(self) -> bool:
        """An event stream's end went out: the client has the whole answer. (A filter sends whole events, so
        the last chunk it let through ends with [DONE]; an unfiltered body's tail holds it across chunks.)"""
        if not self.sse:
            return False
        if self._responses:
            return self._ended
        return (self.last_sent if self._filter is not None else self._tail.tail).endswith(ENDS)

    def usage(self) -> tuple[Usage | None, bytes | None]:
        """The usage a filter read, or else the body's last bytes, where vLLM puts it (parse_usage)."""
        if self._filter is not None:
            return self._filter.usage, None
        return None, self._tail.tail
