"""Affinity keys: a 64-bit hash of a request's prompt prefix or session, and rendezvous ranking.

Every gateway replica computes the same key for the same request and the same ranking over the same
backends, so replicas agree on where a prefix lives without sharing any state. Python's built-in
`hash()` is salted per process, so keys use blake2b and URLs crc32 instead.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

MASK64 = (1 << 64) - 1


def _digest(*parts: str) -> int:
    h = blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little")


def url_hash(url: str) -> int:
    return zlib.crc32(url.encode()) * 0x9E3779B97F4A7C15 & MASK64


def rendezvous_score(key: int, backend_hash: int) -> int:
    """Highest random weight: each backend's score for a key; the top score owns the key.

    One multiply-xorshift round: `key` is already a uniform 64-bit hash, so this is enough to make
    each backend's score independent, and it keeps a pick over eight backends to a few microseconds.
    """
    value = (key ^ backend_hash) * 0xBF58476D1CE4E5B9 & MASK64
    return value ^ (value >> 31)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def prompt_prefix(payload: Mapping[str, Any], limit: int) -> str:
    """The leading `limit` characters of the prompt as the engine will see it (roughly rendered)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            part = f"{message.get('role', '')}\n{_text(message.get('content'))}\n"
            parts.append(part)
            size += len(part)
            if size >= limit:
                break
        return "".join(parts)[:limit]
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            value = value[0]  # a batch: route by its first prompt
        if isinstance(value, str):
            return value[:limit]
        if isinstance(value, list):  # token ids
            return ",".join(str(token) for token in value[: max(limit // 4, 1)])
    return ""


def prefix_key(model: str, payload: Mapping[str, Any] | None, limit: int, block: int) -> int | None:
    """Hash of the model and the prompt's leading whole blocks of `block` characters (None: no prompt).

    Cutting at a block boundary makes prompts that share their first blocks share a key even when one
    of them is longer, which is what the engine's block-wise prefix cache rewards.
    """
    if payload is None:
        return None
    text = prompt_prefix(payload, limit)
    if not text:
        return None
    if len(text) >= block:
        text = text[: len(text) // block * block]
    return _digest("prefix", model, text)


def session_key(model: str, payload: Mapping[str, Any] | None, headers: Mapping[str, str], header: str) -> int | None:
    """Hash of the session id from the header, or else the body's `user` (None: no session)."""
    session = headers.get(header)
    if not session and payload is not None:
        user = payload.get("user")
        session = user if isinstance(user, str) else None
    if not session:
        return None
    return _digest("session", model, session)


def name_key(name: str) -> int:
    return _digest("name", name)
