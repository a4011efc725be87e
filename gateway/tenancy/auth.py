"""Client API keys: who is calling, which models they may use, and their rate limits.

Presented keys are looked up by their SHA-256 digest and then compared with hmac.compare_digest, so
neither the lookup nor the comparison takes time that depends on how much of a guess was right.
Keys never appear in logs or errors: a key is known by its name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
from dataclasses import dataclass, field

from starlette.types import Scope

from gateway.errors import RateLimited, Unauthorized
from gateway.settings import ApiKeySettings, AuthSettings
from gateway.tenancy.rate_limit import TokenBucket


@dataclass(eq=False)
class Principal:
    name: str
    digest: bytes
    patterns: tuple[str, ...]
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    _allowed: dict[str, bool] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        allowed = self._allowed.get(model)
        if allowed is None:
            if len(self._allowed) > 10_000:  # bounded: model names come from backends, but be safe
                self._allowed.clear()
            allowed = self._allowed[model] = any(fnmatch.fnmatchcase(model, p) for p in self.patterns)
        return allowed

    def admit(self) -> list[tuple[bytes, bytes]]:
        """Take one request from the buckets or raise RateLimited; returns x-ratelimit-* headers."""
        if self.requests is not None and not self.requests.try_take():
            wait = self.requests.seconds_until()
            raise RateLimited(
                f"Rate limit reached for key {self.name!r}: {self.requests.limit} requests per minute.",
                headers=_retry_headers(wait, self),
            )
        if self.tokens is not None and not self.tokens.has_room():
            wait = self.tokens.seconds_until(1.0)
            raise RateLimited(
                f"Rate limit reached for key {self.name!r}: {self.tokens.limit} tokens per minute.",
                headers=_retry_headers(wait, self),
            )
        return rate_headers(self)

    def charge_tokens(self, count: int) -> None:
        if self.tokens is not None and count:
            self.tokens.charge(count)


_RATE_HEADER_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}".encode(), f"x-ratelimit-remaining-{kind}".encode(),
           f"x-ratelimit-reset-{kind}".encode())
    for kind in ("requests", "tokens")
}  # fmt: skip


def rate_headers(principal: Principal) -> list[tuple[bytes, bytes]]:
    headers = []
    for kind, bucket in (("requests", principal.requests), ("tokens", principal.tokens)):
        if bucket is not None:
            limit, remaining, reset = _RATE_HEADER_NAMES[kind]
            level = bucket.level()  # one clock read for the three values
            headers += [
                (limit, b"%d" % bucket.limit),
                (remaining, b"%d" % max(0, math.floor(level))),
                (reset, b"%.3fs" % ((bucket.limit - level) / bucket.rate)),
            ]
    return headers


def _retry_headers(wait: float, principal: Principal) -> dict[str, str]:
    headers = {name.decode(): value.decode() for name, value in rate_headers(principal)}
    headers["Retry-After"] = str(max(1, int(wait + 0.999)))
    return headers


def _principal(key: ApiKeySettings) -> Principal:
    return Principal(
        name=key.name,
        digest=hashlib.sha256(key.secret().encode()).digest(),
        patterns=tuple(key.models),
        requests=TokenBucket(key.requests_per_minute) if key.requests_per_minute else None,
        tokens=TokenBucket(key.tokens_per_minute) if key.tokens_per_minute else None,
    )


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        principals = [_principal(key) for key in settings.keys]
        self._by_digest = {principal.digest: principal for principal in principals}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, scope: Scope) -> Principal:
        """The caller's principal, or Unauthorized (401). Only call when `enabled`."""
        presented = _bearer(scope)
        if presented is None:
            raise Unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
        digest = hashlib.sha256(presented).digest()
        principal = self._by_digest.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise Unauthorized("Incorrect API key provided.")
        return principal


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None
