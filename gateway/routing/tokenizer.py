"""A prompt's token ids as the engine will see them, from the engine itself (`POST /tokenize`).

Why the backend's own /tokenize rather than a tokenizer in the gateway: it renders the model's chat template
(tools, special tokens, the adapter's template) and tokenizes exactly as the engine will, for any model,
with no model files, hub access or configuration at the gateway, and it cannot drift from the engine's
version. Its cost is a round trip to one backend, paid only when it can pay off: a long enough prompt, for a
model whose engines publish KV events. Answers are cached (a repeated prompt is tokenized once), and a slow or
failed answer gives None: the request is then routed by the approximate index, never delayed further.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from hashlib import blake2b
from typing import Any

import orjson

from gateway.errors import UpstreamError

# (backend url, path, headers, body, timeout) -> (status, body); the proxy's upstream pool provides it.
Fetch = Callable[[str, bytes, list[tuple[bytes, bytes]], bytes, float], Awaitable[tuple[int, bytes]]]

# Fields of a chat request that change how its template renders (vLLM's TokenizeChatRequest takes them).
CHAT_FIELDS = (
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
    "documents",
)


def tokenize_body(model: str, payload: Mapping[str, Any]) -> bytes | None:
    """The /tokenize request for a chat or completion payload (None: nothing to tokenize)."""
    if isinstance(payload.get("messages"), list):
        body = {name: payload[name] for name in CHAT_FIELDS if name in payload}
    elif isinstance(payload.get("prompt"), str):
        body = {"prompt": payload["prompt"]}
        if "add_special_tokens" in payload:
            body["add_special_tokens"] = payload["add_special_tokens"]
    else:
        return None
    body["model"] = model
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


class Tokenizer:
    def __init__(self, fetch: Fetch, timeout: float, max_entries: int = 1024, max_tokens: int = 4_000_000) -> None:
        self._fetch = fetch
        self._timeout = timeout
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._max_entries = max_entries
        self._max_tokens = max_tokens
        self._tokens = 0
        self.calls = 0
        self.failures = 0

    async def tokens(self, url: str, api_key: str | None, body: bytes) -> list[int] | None:
        key = blake2b(body, digest_size=16).digest()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        headers = [(b"content-type", b"application/json")]
        if api_key:
            headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
        self.calls += 1
        try:
            async with asyncio.timeout(self._timeout):
                status, answer = await self._fetch(url, b"/tokenize", headers, body, self._timeout)
            tokens = orjson.loads(answer)["tokens"] if status == 200 else None
        except (TimeoutError, UpstreamError, ValueError, KeyError, TypeError):
            tokens = None  # routing goes on without the tokens: it never fails a request
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            self.failures += 1
            return None
        self._remember(key, tokens)
        return tokens

    def _remember(self, key: bytes, tokens: list[int]) -> None:
        if len(tokens) > self._max_tokens:
            return
        self._cache[key] = tokens
        self._tokens += len(tokens)
        while len(self._cache) > self._max_entries or self._tokens > self._max_tokens:
            _, dropped = self._cache.popitem(last=False)
            self._tokens -= len(dropped)
