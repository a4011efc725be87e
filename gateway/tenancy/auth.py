"""Client API keys: who is calling, which models they may use, and their rate limits.

Presented keys are looked up by their SHA-256 digest and then compared with hmac.compare_digest, so
neither the lookup nor the comparison takes time that depends on how much of a guess was right.
Keys never appear in logs or errors: a key is known by its name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass, field
from time import monotonic

from starlette.types import Scope

from gateway.errors import RateLimited, Unauthorized
from gateway.proxy.headers import header
from gateway.settings import ApiKeySettings, AuthSettings
from gateway.tenancy.rate_limit import TokenBucket

_REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")
Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(eq=False)
class Principal:
    name: str
    digest: bytes
    patterns: tuple[str, ...]
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    _allowed: dict[str, bool] = field(default_factory=dict)
    # Each bucket with its x-ratelimit-* header names and the three headers it sends while full.
    rate_limits: tuple[tuple[tuple[bytes, bytes, bytes], TokenBucket, Headers], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rate_limits = tuple(
            (names, bucket, ((names[0], bucket.limit_text), (names[1], bucket.limit_text), (names[2], b"0.000s")))
            for names, bucket in ((_REQUEST_HEADERS, self.requests), (_TOKEN_HEADERS, self.tokens))
            if bucket is not None
        )

    def may_use(self, model: str) -> bool:
        allowed = self._allowed.get(model)
        if allowed is None:
            if len(self._allowed) > 10_000:  # bounded: model names come from backends, but be safe
                self._allowed.clear()
            allowed = self._allowed[model] = any(fnmatch.fnmatchcase(model, p) for p in self.patterns)
        return allowed

    def admit(self) -> list[tuple[bytes, bytes]]:
        """Take one request from the buckets or raise RateLimited (taking nothing); returns x-ratelimit-*
        headers."""
        now = monotonic()
        requests, tokens = self.requests, self.tokens
        if tokens is not None and tokens.level(now) <= 0:  # first: a refused request takes no request
            raise RateLimited(
                f"Rate limit reached for key {self.name!r}: {tokens.limit} tokens per minute.",
                headers=_retry_headers(tokens.seconds_until(now), self, now),
            )
        if requests is not None and not requests.try_take(now):
            raise RateLimited(
                f"Rate limit reached for key {self.name!r}: {requests.limit} requests per minute.",
                headers=_retry_headers(requests.seconds_until(now), self, now),
            )
        return rate_headers(self, now)

    def charge_tokens(self, count: int) -> None:
        if self.tokens is not None and count:
            self.tokens.charge(monotonic(), count)


def rate_headers(principal: Principal, now: float) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for names, bucket, full in principal.rate_limits:
        level = bucket.level(now)
        if level >= bucket.limit:  # full (the token bucket of a key under its limit): always the same three
            headers += full
            continue
        headers.append((names[0], bucket.limit_text))
        headers.append((names[1], b"%d" % (level if level > 0 else 0)))  # %d truncates: the floor
        headers.append((names[2], b"%.3fs" % ((bucket.limit - level) / bucket.rate)))
    return headers


def _retry_headers(wait: float, principal: Principal, now: float) -> dict[str, str]:
    headers = {name.decode(): value.decode() for name, value in rate_headers(principal, now)}
    headers["Retry-After"] = str(max(1, int(wait + 0.999)))
    return headers


def _principal(key: ApiKeySettings, now: float) -> Principal:
    return Principal(
        name=key.name,
        digest=hashlib.sha256(key.secret().encode()).digest(),
        patterns=tuple(key.models),
        requests=TokenBucket(key.requests_per_minute, now) if key.requests_per_minute else None,
        tokens=TokenBucket(key.tokens_per_minute, now) if key.tokens_per_minute else None,
    )


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        now = monotonic()
        principals = [_principal(key, now) for key in settings.keys]
        self._by_digest = {principal.digest: principal for principal in principals}
        # Authorization header values that authenticated: a key's later requests skip parsing the header and the
        # digest (a third of the keys' cost per request). Only values that passed are kept, so it holds about as
        # many entries as there are keys (and spellings of their header); a guess never reaches it, and its
        # lookup compares the bytes only on a full 64-bit hash match (Python's bytes hash is keyed per process).
        self._known: dict[bytes, Principal] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, scope: Scope) -> Principal:
        """The caller's principal, or Unauthorized (401). Only call when `enabled`."""
        value = header(scope, b"authorization")
        if value is not None:
            known = self._known.get(value)
            if known is not None:
                return known
        # Anthropic's SDK (for /v1/messages) sends its key as `x-api-key`
        presented = _bearer(value) if value is not None else (header(scope, b"x-api-key") or b"").strip() or None
        if presented is None:
            raise Unauthorized("Missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.")
        digest = hashlib.sha256(presented).digest()
        principal = self._by_digest.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise Unauthorized("Incorrect API key provided.")
        if value is not None and len(self._known) < 4 * len(self._by_digest) + 16:
            self._known[value] = principal
        return principal


def _bearer(value: bytes | None) -> bytes | None:
    """The key in an `Authorization: Bearer <key>` value."""
    if value is None:
        return None
    scheme, _, credentials = value.partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip():
        return credentials.strip()
    return None
