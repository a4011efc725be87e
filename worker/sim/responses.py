"""Builders for vLLM-shaped response bodies and SSE chunks (chat, completions, usage, errors, model cards).

Shapes (keys, their order, which ones are null and which are left out) are vLLM 0.32's, checked against
answers captured from the real server: streamed chunks are dumped with `exclude_unset` (so a token chunk
always carries `token_ids`, null unless `return_token_ids`), the trailing usage chunk with `exclude_none`
too; the mid-stream error event is `json.dumps` of the error body (spaces after separators).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

JSON = dict[str, Any]
DONE = b"data: [DONE]\n\n"
_TEXT_SLOT = "\u0000token-text\u0000"  # placeholders in a pre-rendered chunk
_IDS_SLOT = "\u0000token-ids\u0000"


def sse(obj: JSON) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_error_event(message: str, err_type: str, status: int) -> bytes:
    """What vLLM sends when a stream fails after its 200: this event, then `data: [DONE]`."""
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass(frozen=True)
class CacheUsage:
    """Prefix-cache figures of one request, for `usage.prompt_tokens_details`."""

    cached_tokens: int
    created_cache_tokens: int  # prompt tokens this request computed into cached blocks (chat reports it)


def usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}  # fmt: skip


def final_usage(prompt: int, completion: int, cache: CacheUsage | None, chat: bool, streamed: bool) -> JSON:
    """The request's usage: non-streamed with every field (nulls included), streamed without the nulls."""
    body = usage(prompt, completion)
    details: JSON | None = None
    if cache is not None:
        details = {"cached_tokens": cache.cached_tokens,
                   "created_cache_tokens": cache.created_cache_tokens if chat else None,
                   "multimodal_tokens": None}  # fmt: skip
        if streamed:
            details = {k: v for k, v in details.items() if v is not None}
    if not streamed:
        body["prompt_tokens_details"] = details
        body["completion_tokens_details"] = None
    elif details is not None:
        body["prompt_tokens_details"] = details
    return body


def model_card(model_id: str, root: str, parent: str | None, max_model_len: int | None) -> JSON:
    now = int(time.time())
    return {
        "id": model_id,
        "object": "model",
        "created": now,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


class ChunkWriter:
    """Makes the SSE events of one streamed chat or completions response."""

    def __init__(
        self,
        chat: bool,
        model: str,
        prompt_token_ids: list[int],
        *,
        fingerprint: str,
        continuous_usage: bool = False,
        include_usage: bool = False,
        return_token_ids: bool = False,
        role: str = "assistant",
    ) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.prompt_token_ids = prompt_token_ids
        self.prompt_tokens = len(prompt_token_ids)
        self.fingerprint = fingerprint
        self.continuous_usage = continuous_usage
        self.include_usage = include_usage
        self.return_token_ids = return_token_ids
        self.role_name = role
        self._prompt_ids_sent = False
        # the bytes around a plain token's text and ids, so most chunks cost one small dumps()
        head, rest = self._chunk([self._token_choice(_TEXT_SLOT, None, None)], 0).split(orjson.dumps(_TEXT_SLOT), 1)
        self._head, self._tail = head, rest
        self._mid = b""
        if return_token_ids:
            self._mid, self._tail = rest.split(orjson.dumps(_IDS_SLOT), 1)

    def _usage(self, completion_tokens: int) -> JSON:
        body = usage(self.prompt_tokens, completion_tokens)
        if self.chat:
            body["completion_tokens_details"] = None
        return body

    def _chunk(self, choices: list[JSON], completion_tokens: int, final: bool = False) -> bytes:
        body: JSON = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": choices}  # fmt: skip
        if self.continuous_usage:
            body["usage"] = self._usage(completion_tokens)
        if final and not self.include_usage:
            body["system_fingerprint"] = self.fingerprint
        return sse(body)

    def role(self) -> bytes:
        """Chat only: the opening delta vLLM sends before any content (prompt ids ride on it)."""
        choice = {"index": 0, "delta": {"role": self.role_name, "content": ""}, "logprobs": None,
                  "finish_reason": None}  # fmt: skip
        body: JSON = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": [choice]}  # fmt: skip
        if self.continuous_usage:
            body["usage"] = self._usage(0)
        body["prompt_token_ids"] = self.prompt_token_ids if self.return_token_ids else None
        body["prompt_text"] = None
        return sse(body)

    def _token_choice(self, text: str, token_id: int | None, finish: tuple[str, str | None] | None) -> JSON:
        ids: Any = None
        if self.return_token_ids:
            ids = _IDS_SLOT if token_id is None else [token_id]
        choice: JSON
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            if finish is not None:
                choice["finish_reason"], choice["stop_reason"] = finish
            choice["token_ids"] = ids
        else:
            reason, stop_reason = finish if finish is not None else (None, None)
            prompt_ids = None
            if self.return_token_ids and token_id is not None and not self._prompt_ids_sent:
                prompt_ids, self._prompt_ids_sent = self.prompt_token_ids, True  # on the first chunk only
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason,
                      "prompt_token_ids": prompt_ids, "token_ids": ids}  # fmt: skip
        return choice

    def token(self, text: str, token_id: int, completion_tokens: int,
              finish: tuple[str, str | None] | None = None) -> bytes:  # fmt: skip
        """One token; `finish` = (finish_reason, stop_reason) on the request's last token."""
        first_with_prompt = self.return_token_ids and not self.chat and not self._prompt_ids_sent
        if finish is None and not self.continuous_usage and not first_with_prompt:
            if self.return_token_ids:
                return b"%s%s%s[%d]%s" % (self._head, orjson.dumps(text), self._mid, token_id, self._tail)
            return self._head + orjson.dumps(text) + self._tail
        choice = self._token_choice(text, token_id, finish)
        return self._chunk([choice], completion_tokens, final=finish is not None)

    def usage_chunk(self, completion_tokens: int, cache: CacheUsage | None) -> bytes:
        totals = final_usage(self.prompt_tokens, completion_tokens, cache, self.chat, True)
        body: JSON = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": [], "usage": totals, "system_fingerprint": self.fingerprint}  # fmt: skip
        return sse(body)


@dataclass(frozen=True)
class Answer:
    """Everything a non-streamed body reports about one finished request."""

    model: str
    text: str
    finish_reason: str
    stop_reason: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    cache: CacheUsage | None
    fingerprint: str
    return_token_ids: bool


def chat_response(a: Answer, role: str) -> JSON:
    message: JSON = {"role": role, "content": a.text, "refusal": None, "annotations": None, "audio": None,
                     "function_call": None, "reasoning": None}  # fmt: skip
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": a.finish_reason,
              "stop_reason": a.stop_reason, "token_ids": a.token_ids if a.return_token_ids else None,
              "routed_experts": None}  # fmt: skip
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": a.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": a.fingerprint,
        "usage": final_usage(len(a.prompt_token_ids), len(a.token_ids), a.cache, True, False),
        "prompt_logprobs": None,
        "prompt_token_ids": a.prompt_token_ids if a.return_token_ids else None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def completion_response(a: Answer) -> JSON:
    choice = {"index": 0, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason,
              "stop_reason": a.stop_reason, "token_ids": a.token_ids if a.return_token_ids else None,
              "prompt_logprobs": None, "prompt_token_ids": a.prompt_token_ids if a.return_token_ids else None,
              "routed_experts": None}  # fmt: skip
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": a.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": a.fingerprint,
        "usage": final_usage(len(a.prompt_token_ids), len(a.token_ids), a.cache, False, False),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }
