"""Mid-stream failover: which streams may be continued on another backend, and the request that continues one.

A chat or completions stream is continued from exactly the tokens it already sent: the upstream request asks
for vLLM's `return_token_ids`, so the stream tells the prompt's token ids (first event) and each event's
generated ids. The continuation is a `/v1/completions` request whose prompt is those ids followed by the
generated ones, with `max_tokens` (and `min_tokens`) reduced by what was generated. A chat stream continues on
/v1/completions too, because the chat route takes no token-id prompt, and continuing there from re-rendered,
re-tokenised text is not always the same tokens (a template that trims the partial message, a word the
tokenizer would have split otherwise); failover_stream.py turns its events back into chat chunks.

Streams that cannot be continued faithfully keep the in-band error event: several choices (`n`, `best_of`),
log probabilities (their values would belong to another prompt), `echo`, tools offered (their parser runs only
on the chat route), constrained decoding (its grammar would restart), presence and frequency penalties (they
count the output tokens, which become prompt tokens), `continuous_usage_stats`, multimodal chat content
(its token ids stand for data the continuation would not carry), and several prompts in one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Scope

from gateway.proxy.headers import header
from gateway.proxy.vllm_bool import is_true
from gateway.settings import FailoverSettings

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
COMPLETIONS_TARGET = COMPLETIONS_ROUTE.encode()
OPT_OUT_HEADER = b"x-switchyard-failover"
OPT_OUT_VALUES = frozenset({b"off", b"false", b"0", b"no"})

# Chat fields a /v1/completions continuation does without (the prompt is already rendered and tokenised).
_CHAT_ONLY = frozenset(
    {
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "mm_processor_kwargs",
        "media_io_kwargs",
        "reasoning_effort",
        "include_reasoning",
        "return_prompt_text",
        "max_completion_tokens",
        "logprobs",  # a boolean on chat, a count on completions: false here would ask for one logprob
        "top_logprobs",
        "add_special_tokens",
        "echo",
    }
)


_CONSTRAINTS = (
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FailoverPlan:
    """What the gateway decided for one stream: continue it if its backend fails (`refusal` None), or why not."""

    chat: bool = False
    keep_ids: bool = False  # the client asked for return_token_ids itself: its events keep them
    show_usage: bool = False  # the client asked for the usage event
    refusal: str | None = None

    @property
    def capable(self) -> bool:
        return self.refusal is None


class FailoverPolicy:
    def __init__(self, settings: FailoverSettings) -> None:
        self._enabled = settings.enabled and settings.max_attempts > 0

    def plan(self, route: str, payload: Mapping[str, Any] | None, scope: Scope) -> FailoverPlan | None:
        """The plan for a request: None when it is not a chat or completions stream, failover is off, or the
        request opted out (`X-Switchyard-Failover: off`)."""
        if not self._enabled or payload is None or not is_true(payload.get("stream")):
            return None
        chat = route == CHAT_ROUTE
        if not chat and route != COMPLETIONS_ROUTE:
            return None
        opt_out = header(scope, OPT_OUT_HEADER)
        if opt_out is not None and opt_out.strip().lower() in OPT_OUT_VALUES:
            return None
        options = payload.get("stream_options")
        show_usage = isinstance(options, dict) and is_true(options.get("include_usage"))
        keep_ids = is_true(payload.get("return_token_ids"))
        refusal = _refusal(payload, chat)
        return FailoverPlan(chat=chat, keep_ids=keep_ids, show_usage=show_usage, refusal=refusal)


def _refusal(payload: Mapping[str, Any], chat: bool) -> str | None:
    """Why a stream could not be continued faithfully, or None."""
    if payload.get("n") not in (None, 1) or payload.get("best_of") not in (None, 1):
        return "several choices"
    if payload.get("use_beam_search"):
        return "beam search"
    logprobs = payload.get("logprobs")
    if (logprobs is not None and logprobs is not False) or payload.get("prompt_logprobs") is not None:
        return "logprobs"
    if payload.get("echo"):
        return "echo"
    if payload.get("presence_penalty") or payload.get("frequency_penalty"):
        return "presence or frequency penalty"
    response_format = payload.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "constrained decoding"
    if any(payload.get(key) is not None for key in _CONSTRAINTS):
        return "constrained decoding"
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "continuous usage stats"
    if payload.get("return_token_offsets") or payload.get("suffix") is not None:
        return "unsupported field"
    if not _int_or_none(payload, "max_tokens") or not _int_or_none(payload, "min_tokens"):
        return "invalid token counts"
    if chat:
        if payload.get("tools") and payload.get("tool_choice", "auto") != "none":
            return "tools"
        if not _int_or_none(payload, "max_completion_tokens"):
            return "invalid token counts"
        return _chat_content_refusal(payload.get("messages"))
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) != 1:
        return "several prompts"
    if payload.get("prompt_embeds") is not None:
        return "prompt embeds"
    return None


def _int_or_none(payload: Mapping[str, Any], key: str) -> bool:
    value = payload.get(key)
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _chat_content_refusal(messages: object) -> str | None:
    if not isinstance(messages, list):
        return "invalid messages"
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not isinstance(part, dict) or part.get("type") != "text" for part in content
        ):
            return "multimodal content"
    return None


def continuation_body(
    payload: Mapping[str, Any], chat: bool, token_ids: list[int], generated: int, max_model_len: int | None
) -> bytes | None:
    """The /v1/completions body that continues a stream: `token_ids` is the prompt followed by the `generated`
    tokens the client already has. None when there is nothing to continue, or when it cannot be built (a chat
    without max_tokens on a backend that does not say its context length: /v1/completions would stop at 16)."""
    body = {key: value for key, value in payload.items() if key not in _CHAT_ONLY} if chat else dict(payload)
    limit = payload.get("max_completion_tokens") if chat else None
    if limit is None:
        limit = payload.get("max_tokens")
    if limit is None and chat:
        if max_model_len is None:
            return None
        limit = max_model_len - len(token_ids) + generated  # what chat's default would have allowed
    if limit is not None:
        if limit - generated < 1:
            return None  # all its tokens came, only the finish did not: nothing to continue
        body["max_tokens"] = limit - generated
    min_tokens = payload.get("min_tokens")
    if min_tokens:
        body["min_tokens"] = max(min_tokens - generated, 0)
    body["prompt"] = token_ids
    body["stream"] = True
    options = payload.get("stream_options")
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    body["return_token_ids"] = True
    # The ids are those the engine ran, after any truncation: truncating again would cut the prompt's start.
    body.pop("truncate_prompt_tokens", None)
    return orjson.dumps(body)


def inject_return_token_ids(body: bytes) -> bytes:
    """Append `"return_token_ids": true` as the object's last key (the last of duplicate keys wins)."""
    end = body.rstrip().rfind(b"}")
    return body[:end] + b',"return_token_ids":true' + body[end:]


def max_model_len(cards: Mapping[str, Mapping[str, Any]], model: str) -> int | None:
    """The context length a backend's /v1/models card gives for `model` (an adapter's is its parent's)."""
    card = cards.get(model)
    if card is None:
        return None
    length = card.get("max_model_len")
    if length is None and isinstance(card.get("parent"), str):
        parent = cards.get(card["parent"])
        length = parent.get("max_model_len") if parent else None
    return length if isinstance(length, int) else None
