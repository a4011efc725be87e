"""Builders for vLLM-shaped response bodies and SSE chunks (chat, completions, usage, model cards)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

JSON = dict[str, Any]
DONE = b"data: [DONE]\n\n"
_SLOT = "\u0000token-text\u0000"  # placeholder for a token's text in a pre-rendered chunk


def sse(obj: JSON) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


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

    def __init__(self, chat: bool, model: str, prompt_tokens: int, continuous_usage: bool) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.continuous_usage = continuous_usage
        # the bytes around a plain token's text, so most chunks cost one small dumps()
        plain = self._token_choice(_SLOT, None)
        self._head, self._tail = self._chunk([plain], 0).split(orjson.dumps(_SLOT), 1)

    def _chunk(self, choices: list[JSON], completion_tokens: int) -> bytes:
        body: JSON = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": choices}  # fmt: skip
        if self.continuous_usage:
            body["usage"] = usage(self.prompt_tokens, completion_tokens)
        return sse(body)

    def role(self) -> bytes:
        """Chat only: the opening delta vLLM sends before any content."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], 0)

    def _token_choice(self, text: str, finish: tuple[str, str | None] | None) -> JSON:
        choice: JSON
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            if finish is not None:
                choice["finish_reason"], choice["stop_reason"] = finish
        else:
            reason, stop_reason = finish if finish is not None else (None, None)
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": stop_reason}
        return choice

    def token(self, text: str, completion_tokens: int, finish: tuple[str, str | None] | None = None) -> bytes:
        """One token; `finish` = (finish_reason, stop_reason) on the request's last token."""
        if finish is None and not self.continuous_usage:
            return self._head + orjson.dumps(text) + self._tail
        return self._chunk([self._token_choice(text, finish)], completion_tokens)

    def usage_chunk(self, completion_tokens: int) -> bytes:
        body: JSON = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                      "choices": [], "usage": usage(self.prompt_tokens, completion_tokens)}  # fmt: skip
        return sse(body)


def chat_response(model: str, text: str, finish: str, stop_reason: str | None, prompt: int, completion: int) -> JSON:
    message: JSON = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
               "function_call": None, "tool_calls": [], "reasoning_content": None}  # fmt: skip
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt, completion),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def completion_response(
    model: str, text: str, finish: str, stop_reason: str | None, prompt: int, completion: int
) -> JSON:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason,
              "prompt_logprobs": None}  # fmt: skip
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt, completion),
        "kv_transfer_params": None,
    }
