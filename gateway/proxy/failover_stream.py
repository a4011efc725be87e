"""A stream that may fail over, event by event: what reached the client, and the rewriting that makes its
continuations one stream with it.

The original backend's events are only looked at, with byte searches (no JSON parse): the ids of vLLM's
`return_token_ids` are recorded and, unless the client asked for them, set back to `null` (what vLLM sends
without the flag), and the usage event the gateway asked for is held back. A continuation's events (only after
a failure) are parsed and made again: the original `id`, `object`, `created` and `model`; no second role
chunk; completions events turned into chat chunks for a chat; usage counted over all the parts (the prompt
tokens of the original request, the completion tokens of every part).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import ErrorEvent
from gateway.proxy.failover import FailoverPlan
from gateway.proxy.sse import DONE, SEP, joined_if_ended, separator
from gateway.proxy.usage import CONTENT_EVENT, Usage, parse_usage

_DATA = b"data: "
_ERROR = b'data: {"error"'
_CHOICES = b'"choices":['
_IDS = b'"token_ids":['  # the ids of one event (the quote before it: not "prompt_token_ids")
_PROMPT_IDS = b'"prompt_token_ids":['
_FINISH = b'"finish_reason":'  # a string after it (not null): the stream's last content event
_REASONING_DELTA = b'{"index":0,"delta":{"reasoning'  # reasoning_content (or reasoning) deltas
_HEAD_KEYS = ("id", "object", "created", "model")
_CLOSE = ord("]")


class FailoverStream:
    """One failover-capable stream: the filter of its relay (feed, flush, usage), and what a continuation needs.

    Each event of the original backend costs a few byte operations: what only matters if the stream fails (did
    its finish go out? was it reasoning?) is read off the last content event then, not off every event."""

    def __init__(self, plan: FailoverPlan) -> None:
        self.plan = plan
        self._strip = not plan.keep_ids
        self._held: list[bytes] = []  # the start of an event whose end has not come (sse.joined_if_ended)
        self._sep: bytes | None = None  # the backend's event separator, once an event has ended (sse.py)
        self._continuing = False  # the events come from a continuation
        self._translate = False  # ... of a chat, from /v1/completions
        self._head: dict[str, Any] | None = None  # id, object, created and model of the first event
        self._prefix = b""  # its bytes up to its choices: every event of the same backend starts so
        self._count_from = 0  # where content is searched for in an event that starts with the prefix
        self._prompt_ids = b""  # comma-separated, as sent
        # The generated ids as sent, each event's led by its "[" ("[7[8,9": 7, 8, 9): a few bytes a token.
        self._generated = bytearray()
        self._part_start = 0  # tokens generated when the current part began
        self._last = b""  # the original backend's last content event, as received
        self._sent = False  # an event with content or a role went out (a failover is then a continuation)
        self._finished = False  # a continuation's finish went out
        self.done = False  # [DONE] came
        self.failure: ErrorEvent | None = None  # the backend sent an error event: fail over from here
        self.usage: Usage | None = None
        self.content_events = 0  # in the whole events of the last chunk fed: those with generated content (usage.py)

    # -- the relay's filter ---------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            joined = joined_if_ended(self._held, chunk, self._sep)
            if joined is None:
                self.content_events = 0
                return b""
            data = joined
            headed: bool | None = None  # not looked at
        else:
            data = chunk
            headed = bool(self._prefix) and chunk.startswith(self._prefix)
        sep = self._sep or separator(data)
        if sep is None:  # the first event has not ended yet
            self._held.append(data)
            self.content_events = 0
            return b""
        self._sep = sep
        end = data.find(sep)
        if end >= 0 and end == len(data) - len(sep) and self.failure is None:  # one whole event: vLLM writes each
            # at once. Its content (for the stream's timing) is searched after the head it shares with the
            # first event, which holds no content (checked once).
            self.content_events = len(CONTENT_EVENT.findall(data, self._count_from if headed else 0))
            if self._continuing:
                return self._continued(data)
            if headed and data[len(self._prefix)] != _CLOSE:  # a content event, the usual case
                return self._take_ids(data)
            return self._other(data)
        last = data.rfind(sep)
        self.content_events = len(CONTENT_EVENT.findall(data, 0, last + len(sep))) if last >= 0 else 0
        out = []
        start = 0
        while end >= 0 and self.failure is None:
            event = data[start : end + len(sep)]
            prefix = self._prefix  # (learned from the first event: it may be new)
            if self._continuing:
                out.append(self._continued(event))
            elif prefix and event.startswith(prefix) and event[len(prefix)] != _CLOSE:
                out.append(self._take_ids(event))
            else:
                out.append(self._other(event))
            start = end + len(sep)
            end = data.find(sep, start)
        if self.failure is None and start < len(data):
            self._held.append(data[start:])
        return b"".join(out)

    def flush(self) -> bytes:
        rest = b"".join(self._held)
        self._held.clear()
        return rest

    # -- the original backend's events ----------------------------------------------------------------

    def _take_ids(self, event: bytes) -> bytes:
        """A content event's generated ids (last in vLLM's choice: found from the end) kept and, unless the
        client asked for them, nulled. An event that starts with the first one's head and has choices is one:
        nothing else of it is looked at."""
        at = event.rfind(_IDS)
        if at < 0:
            return event
        at += len(_IDS) - 1
        end = event.find(b"]", at)
        if end < 0:
            return event
        if end > at + 1:
            self._generated += event[at:end]
            self._last = event
        return event[:at] + b"null" + event[end + 1 :] if self._strip else event

    def _other(self, event: bytes) -> bytes:
        """The first event, the usage event, an error event, [DONE], or an event that does not start as the
        first one did (a server whose events put their choices first, say: its head is never learned)."""
        if not event.startswith(b"data: {"):
            if event.startswith(b"data: [DONE]"):
                self.done = True
            return event
        if event.startswith(_ERROR):
            if self._generated:  # content reached the client: this is a failure to fail over from
                self.failure = ErrorEvent(event)
                return b""
            return event  # before any content: the request's own error, it would fail anywhere
        key = event.find(_CHOICES)
        if key >= 0:
            at = key + len(_CHOICES)
            if event.startswith(b"]", at):  # no choices: the usage event
                self.usage = parse_usage(event) or self.usage
                return event if self.plan.show_usage else b""
            if self._head is None and event[key - 1] == ord(","):
                self._learn_head(event[len(_DATA) : key - 1])
                if self._head is not None:
                    self._prefix = event[:at]
                    if CONTENT_EVENT.search(self._prefix) is None:  # no content in it: feed() looks after it
                        self._count_from = at
        # Whatever it holds, this event reaches the client: a failover from here on continues the answer (or,
        # without a learned head, cannot), it never sends the request again.
        self._sent = True
        if not self._prompt_ids:
            ids_at = event.find(_PROMPT_IDS)
            if ids_at >= 0:
                ids_at += len(_PROMPT_IDS) - 1
                end = event.find(b"]", ids_at)
                self._prompt_ids = event[ids_at + 1 : end]
                if self._strip:
                    event = b"".join((event[:ids_at], b"null", event[end + 1 :]))
        self._last = event
        return self._take_ids(event)

    def _learn_head(self, head: bytes) -> None:
        """id, object, created and model, from the bytes of the first event before its choices."""
        try:
            fields = orjson.loads(head + b"}")
        except orjson.JSONDecodeError:
            return
        if isinstance(fields, dict) and all(key in fields for key in _HEAD_KEYS):
            self._head = {key: fields[key] for key in _HEAD_KEYS}

    @property
    def generated(self) -> int:
        """Tokens that reached the client."""
        return self._generated.count(b"[") + self._generated.count(b",")

    @property
    def finished(self) -> bool:
        """The event with the finish_reason went out (only usage and [DONE] can be missing)."""
        if self._finished:
            return True
        at = self._last.rfind(_FINISH)
        return at >= 0 and self._last.startswith(b'"', at + len(_FINISH))

    # -- failing over ---------------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why the stream cannot be continued now, or None."""
        if not self._sent:
            return None  # nothing reached the client: the request is simply sent again
        if self._head is None:
            return "unknown stream head"
        if not self._prompt_ids:
            return "no token ids"  # a server without return_token_ids, or one that hides them
        if self.plan.chat and not self._continuing and self._last.startswith(_REASONING_DELTA, len(self._prefix)):
            return "reasoning in progress"  # its text is not the message's content: no continuation of it
        return None

    def token_ids(self) -> list[int]:
        """The prompt's ids followed by the generated ones, for the continuation's prompt."""
        generated = self._generated.replace(b"[", b",")
        parsed: list[int] = orjson.loads(b"[" + self._prompt_ids + generated + b"]")
        return parsed

    @property
    def started(self) -> bool:
        """Anything of this stream's body reached the client (else a failover is a plain resend)."""
        return self._sent

    def continue_from_here(self, translate: bool) -> None:
        """The next events come from a continuation (`translate`: /v1/completions events for a chat)."""
        self._held.clear()
        self.failure = None
        self._continuing = True
        self._translate = translate
        self._part_start = self.generated

    def resend(self) -> None:
        """The next events come from the same request sent again (nothing of it reached the client)."""
        self._held.clear()
        self.failure = None

    def ending(self) -> bytes:
        """The end of a stream whose last content event went out but whose usage and [DONE] did not."""
        if self.usage is not None:
            return DONE  # the usage event went out (or was held back) already
        prompt, generated = self.prompt_tokens(), self.generated
        self.usage = Usage(prompt, generated)
        if not self.plan.show_usage or self._head is None:
            return DONE
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + generated, "completion_tokens": generated}
        return _DATA + orjson.dumps({**self._head, "choices": [], "usage": usage}) + SEP + DONE

    def prompt_tokens(self) -> int:
        return self._prompt_ids.count(b",") + 1 if self._prompt_ids else 0

    # -- a continuation's events ----------------------------------------------------------------------

    def _continued(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            if event.startswith(b"data: [DONE]"):
                self.done = True
            return event
        if event.startswith(_ERROR):
            self.failure = ErrorEvent(event)
            return b""
        try:
            data = orjson.loads(event[len(_DATA) :])
        except orjson.JSONDecodeError:
            return event
        choices = data.get("choices")
        if not choices:
            usage = data.get("usage")
            if isinstance(usage, dict):
                data["usage"] = self._summed_usage(usage)
            return self._event(data) if self.plan.show_usage else b""
        choice = self._translated(choices[0]) if self._translate else choices[0]
        ids = choice.get("token_ids")
        if ids:
            self._generated += orjson.dumps(ids)[:-1]
        if not self.plan.keep_ids and "token_ids" in choice:
            choice["token_ids"] = None
        if "prompt_token_ids" in choice:
            choice["prompt_token_ids"] = None  # the continuation's prompt: the client's was sent already
        data.pop("prompt_token_ids", None)
        delta = choice.get("delta")
        if isinstance(delta, dict) and "role" in delta:
            del delta["role"]  # a chat continuation's role chunk: the client has had one
            if not delta.get("content") and not ids:
                return b""
        if choice.get("finish_reason") is not None:
            self._finished = True
        data["choices"] = [choice]
        return self._event(data)

    @staticmethod
    def _translated(choice: dict[str, Any]) -> dict[str, Any]:
        """A /v1/completions choice as the chat chunk vLLM would have sent."""
        text = choice.get("text") or ""
        finish = choice.get("finish_reason")
        chat: dict[str, Any] = {
            "index": choice.get("index", 0),
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": finish,
        }
        if finish is not None:
            chat["stop_reason"] = choice.get("stop_reason")
        chat["token_ids"] = choice.get("token_ids")
        return chat

    def _summed_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt = self.prompt_tokens() or usage.get("prompt_tokens", 0) - self._part_start
        completion = self._part_start + usage.get("completion_tokens", 0)
        self.usage = Usage(prompt, completion)
        summed = {**usage, "prompt_tokens": prompt, "total_tokens": prompt + completion}
        summed["completion_tokens"] = completion
        if summed.get("prompt_tokens_details") is not None:
            summed["prompt_tokens_details"] = None  # the continuation's cache hits say nothing of the original's
        return summed

    def _event(self, data: dict[str, Any]) -> bytes:
        head = self._head or {}
        rest = {key: value for key, value in data.items() if key not in head}
        return _DATA + orjson.dumps({**head, **rest}) + SEP
