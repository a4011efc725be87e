"""A request's prompt as routing sees it: its rendered text (for the approximate index) and, when known, its token
ids as the engine will see them (for the precise index), with each index's block keys computed once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.fleet.registry import Backend
from gateway.routing.block_keys import chain_root, char_block_keys, token_block_keys


@dataclass(eq=False, slots=True)
class PromptView:
    text: bytes  # roughly as the chat template renders it: what the approximate index hashes
    lora: str | None = None  # the adapter the request names (adapters never share KV with the base model)
    token_ids: list[int] | None = None  # exactly as the engine will see them, when known
    # Filled by the policy's pick, read by the router: cached tokens predicted on each backend it scored.
    predicted: dict[str, float] = field(default_factory=dict)
    charge: tuple[Backend, int] | None = None  # prefill tokens charged to the chosen backend until the first token
    routed: tuple[str, list[int]] | None = None  # the precise index's blocks on their way to the chosen backend
    _char_keys: tuple[int, list[int]] | None = None
    _token_keys: tuple[int, list[int]] | None = None

    def char_keys(self, block_chars: int) -> list[int]:
        cached = self._char_keys
        if cached is None or cached[0] != block_chars:
            cached = self._char_keys = (block_chars, char_block_keys(self.text, block_chars, chain_root(self.lora)))
        return cached[1]

    def token_keys(self, block_size: int) -> list[int]:
        if self.token_ids is None:
            return []
        cached = self._token_keys
        if cached is None or cached[0] != block_size:
            cached = self._token_keys = (block_size, token_block_keys(self.token_ids, block_size, self.lora))
        return cached[1]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def prompt_view(payload: Mapping[str, Any] | None, lora: str | None) -> PromptView | None:
    """The prompt of a chat, completion or Responses request (None: a body routing cannot read a prompt from).

    Chat messages render as `role\\ncontent\\n` each, tool definitions first: not the model's template, but
    the same for requests that share a prefix, which is all the approximate index needs."""
    if payload is None:
        return None
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        tools = payload.get("tools")
        if tools:
            parts.append(orjson.dumps(tools).decode())
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"{message.get('role', '')}\n{_text(message.get('content'))}\n")
        return PromptView("".join(parts).encode("utf-8", "surrogatepass"), lora)
    for name in ("prompt", "input"):
        value = payload.get(name)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]  # a batch of one
        if isinstance(value, str):
            return PromptView(value.encode("utf-8", "surrogatepass"), lora)
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return PromptView(orjson.dumps(value), lora, token_ids=value)  # token ids: exact, no tokenizing
    return None
