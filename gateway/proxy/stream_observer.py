"""Per-response bookkeeping on the chunks that pass through: time to first token, inter-token gaps,
usage, and what the client was last sent. The bytes are only looked at, unless a filter rewrites them: the
usage-only event the gateway itself asked for is removed (UsageChunkFilter), a failover-capable stream is
kept one stream over its backends (FailoverStream)."""

from __future__ import annotations

from time import perf_counter
from typing import Protocol

from gateway.loop_series import HistogramChild
from gateway.proxy.failover_stream import DONE
from gateway.proxy.usage import Usage, UsageTail, count_content_events


class StreamFilter(Protocol):
    """Rewrites an SSE body on its way to the client, in whole events; holds the usage it saw."""

    usage: Usage | None

    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class ChunkObserver:
    def __init__(self, is_sse: bool, stream_filter: StreamFilter | None, started: float, itl: HistogramChild) -> None:
        self.ttft: float | None = None
        self.last_sent = b"\n\n"  # the last bytes sent: does an injected event need a separator first?
        self.sse = is_sse
        self._started = started
        self._itl = itl
        self._last_token_at = 0.0
        self._tail = UsageTail()
        self._filter = stream_filter if is_sse else None

    def feed(self, chunk: bytes) -> bytes:
        """Observe an upstream chunk; return the bytes to send the client (possibly none)."""
        if self._filter is None:  # a filter reads the usage itself
            self._tail.feed(chunk)
        if not self.sse:
            return chunk
        tokens = count_content_events(chunk)
        if tokens:
            now = perf_counter()
            if self.ttft is None:
                self.ttft = now - self._started
            else:
                self._itl.observe(now - self._last_token_at)
            for _ in range(tokens - 1):  # events that arrived together came with no gap between them
                self._itl.observe(0.0)
            self._last_token_at = now
        if self._filter is not None:
            chunk = self._filter.feed(chunk)
        if chunk:
            self.last_sent = chunk
        return chunk

    def flush(self) -> bytes:
        """Bytes held back (an unfinished event) when the upstream ends."""
        rest = self._filter.flush() if self._filter is not None else b""
        if rest:
            self.last_sent = rest
        return rest

    @property
    def done(self) -> bool:
        """An event stream's [DONE] went out: the client has the whole answer. (A filter sends whole events, so
        the last chunk it let through ends with [DONE]; an unfiltered body's tail holds it across chunks.)"""
        return self.sse and (self.last_sent if self._filter is not None else self._tail.tail).endswith(DONE)

    def usage(self) -> tuple[Usage | None, bytes | None]:
        """The usage a filter read, or else the body's last bytes, where vLLM puts it (parse_usage)."""
        if self._filter is not None:
            return self._filter.usage, None
        return None, self._tail.tail
