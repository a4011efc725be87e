"""Token usage and stream timing, read off the bytes as they pass, without re-serialising anything.

vLLM reports usage in non-stream answers and, for streams, only when asked
(`stream_options.include_usage`). To count tokens for every stream the gateway asks for usage itself
when the client did not, and removes that usage-only chunk before it reaches the client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.proxy.sse import whole_events
from gateway.proxy.vllm_bool import is_true

# Routes whose streams accept stream_options.
USAGE_STREAM_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_CACHED_TOKENS = re.compile(rb'"cached_tokens":\s*(\d+)')  # in prompt_tokens_details (--enable-prompt-tokens-details)
# The Responses API's names for them (its usage: input_tokens, input_tokens_details.cached_tokens, output_tokens).
_INPUT_TOKENS = re.compile(rb'"input_tokens":\s*(\d+)')
_OUTPUT_TOKENS = re.compile(rb'"output_tokens":\s*(\d+)')
_USAGE_ONLY_EVENT = re.compile(rb'"choices":\s*\[\s*\]')
# Generated text in a chat or completions event, not empty: the message's content, its reasoning (vLLM's
# `reasoning`, formerly `reasoning_content`), a tool call's name or arguments, a completion's text. The first
# one marks time to first token.
CONTENT_EVENT = re.compile(rb'"(?:content|text|reasoning(?:_content)?|name|arguments)":\s*"[^"]')
# The same in a Responses API stream: its deltas (its `.done` events repeat the text: they are no tokens).
RESPONSES_CONTENT_EVENT = re.compile(rb'"delta":\s*"[^"]')
_TAIL = 4096  # usage sits at the end of vLLM's JSON answers
_KEPT = 16  # chunks a UsageTail holds before it joins them


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # reported by the engine only when asked to (None: not reported)


def parse_usage(data: bytes) -> Usage | None:
    """The last usage figures in `data` (usage follows choices in vLLM's JSON, and output in a Responses API
    answer's), or None."""
    start = data.rfind(b'"usage":')
    if start < 0 or data.startswith(b"null", start + 8) or data.startswith(b" null", start + 8):
        return None
    prompt = _PROMPT_TOKENS.search(data, start)
    completion_tokens = _COMPLETION_TOKENS
    if prompt is None:
        prompt = _INPUT_TOKENS.search(data, start)  # a Responses API answer's
        if prompt is None:
            return None
        completion_tokens = _OUTPUT_TOKENS
    completion = completion_tokens.search(data, start)
    cached = _CACHED_TOKENS.search(data, start)
    return Usage(
        int(prompt.group(1)), int(completion.group(1)) if completion else 0, int(cached.group(1)) if cached else None
    )


def count_content_events(chunk: bytes) -> int:
    """How many events in `chunk` carry generated content (the empty role-only chunk does not)."""
    return len(CONTENT_EVENT.findall(chunk))


def wants_usage_injection(route: str, payload: Mapping[str, Any] | None) -> bool:
    """True for a stream whose client did not ask for usage (so the gateway asks, then hides it)."""
    if route not in USAGE_STREAM_ROUTES or payload is None or not is_true(payload.get("stream")):
        return False
    options = payload.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and not is_true(options.get("include_usage"))


def inject_include_usage(body: bytes, payload: Mapping[str, Any]) -> bytes:
    """Append `"stream_options": {..., "include_usage": true}` as the object's last key.

    The original bytes stay as they were; JSON parsers (vLLM's included) keep the last of duplicate keys,
    so this overrides a `stream_options` the client sent without include_usage while keeping its other
    fields, but for `continuous_usage_stats`: vLLM honours it only with include_usage, so the client would not
    have had usage in every chunk, and the filter removes only the last chunk's."""
    options = dict(payload.get("stream_options") or {})
    options["include_usage"] = True
    if "continuous_usage_stats" in options:
        options["continuous_usage_stats"] = False
    end = body.rstrip().rfind(b"}")
    return body[:end] + b',"stream_options":' + orjson.dumps(options) + body[end:]


class UsageChunkFilter:
    """Removes the usage-only SSE event the gateway asked for, keeping its figures.

    Complete events pass at once; a partial event waits for its end (an SSE client cannot use half an
    event anyway), so nothing is delayed beyond the upstream's own framing."""

    def __init__(self) -> None:
        self._held: list[bytes] = []  # the start of an event whose end has not come (sse.whole_events)
        self._sep: bytes | None = None  # the stream's event separator, once an event has ended
        self.usage: Usage | None = None
        self.content_events = 0  # in the whole events of the last chunk fed

    def feed(self, chunk: bytes) -> bytes:
        sep = self._sep
        if sep is not None and not self._held and chunk.endswith(sep):  # whole events, the usual case
            complete = chunk
        else:
            whole = whole_events(self._held, chunk, sep)
            if whole is None:
                self.content_events = 0
                return b""
            data, sep, end = whole
            self._sep = sep
            complete = data[:end]
        self.content_events = len(CONTENT_EVENT.findall(complete))
        if b'"usage":' not in complete:
            return complete
        kept = []
        for event in complete.split(sep)[:-1]:
            if b'"usage":' in event and _USAGE_ONLY_EVENT.search(event):
                self.usage = parse_usage(event) or self.usage
                continue
            kept.append(event + sep)
        return b"".join(kept)

    def flush(self) -> bytes:
        rest = b"".join(self._held)
        self._held.clear()
        return rest


class UsageTail:
    """Keeps the last few KB of a passing body, where vLLM puts `usage`.

    The chunks are kept as they came (a chunk costs an append, not a copy of the tail) and joined when the
    tail is asked for, or every _KEPT chunks; a chunk of _TAIL bytes or more is a tail by itself."""

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        if len(chunk) >= _TAIL:
            self._chunks = [chunk]
            return
        chunks = self._chunks
        chunks.append(chunk)
        if len(chunks) > _KEPT:
            self._chunks = [b"".join(chunks)[-_TAIL:]]

    @property
    def tail(self) -> bytes:
        """The body's last _TAIL bytes (all of it, if shorter)."""
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0][-_TAIL:]
        return b"".join(chunks)[-_TAIL:]

    def usage(self) -> Usage | None:
        return parse_usage(self.tail)
