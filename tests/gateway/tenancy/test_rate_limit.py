"""Token buckets and the x-ratelimit-* headers they give, at explicit times (the clock is the caller's)."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited
from gateway.tenancy.auth import Principal, rate_headers
from gateway.tenancy.rate_limit import TokenBucket


def principal(rpm: int | None, tpm: int | None, now: float) -> Principal:
    return Principal(
        name="k",
        digest=b"",
        patterns=("*",),
        requests=TokenBucket(rpm, now) if rpm else None,
        tokens=TokenBucket(tpm, now) if tpm else None,
    )


def test_a_bucket_refills_evenly_up_to_one_minute_and_pays_back_a_token_debt() -> None:
    bucket = TokenBucket(60, now=0.0)  # one unit a second
    assert [bucket.try_take(0.0) for _ in range(61)].count(True) == 60
    assert bucket.seconds_until(0.0) == pytest.approx(1.0)
    assert bucket.level(2.5) == pytest.approx(2.5)
    assert bucket.level(1000.0) == 60  # never more than a minute's worth
    bucket.charge(1000.0, 90)  # usage known after the answer: below zero
    assert bucket.level(1000.0) == pytest.approx(-30)
    assert bucket.seconds_until(1000.0) == pytest.approx(31)


def test_headers_of_full_and_partly_used_buckets() -> None:
    key = principal(600, 10_000, now=0.0)
    assert dict(rate_headers(key, 0.0)) == {  # full: the limit remains, nothing to wait for
        b"x-ratelimit-limit-requests": b"600",
        b"x-ratelimit-remaining-requests": b"600",
        b"x-ratelimit-reset-requests": b"0.000s",
        b"x-ratelimit-limit-tokens": b"10000",
        b"x-ratelimit-remaining-tokens": b"10000",
        b"x-ratelimit-reset-tokens": b"0.000s",
    }
    assert key.requests is not None
    assert key.tokens is not None
    key.requests.try_take(0.0, 3.5)
    key.tokens.charge(0.0, 10_250)
    headers = dict(rate_headers(key, 0.05))  # 0.5 request and 8.33 tokens refilled since
    assert headers[b"x-ratelimit-remaining-requests"] == b"597"  # 597.0: the floor of what is there
    assert headers[b"x-ratelimit-reset-requests"] == b"0.300s"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"0"  # in debt: none remain
    assert headers[b"x-ratelimit-reset-tokens"] == b"61.450s"  # (10,000 + 241.67) / 166.67 per second
    assert headers[b"x-ratelimit-limit-tokens"] == b"10000"


def test_only_the_configured_limits_send_headers() -> None:
    assert [name for name, _ in rate_headers(principal(None, 500, 0.0), 0.0)] == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]
    assert rate_headers(principal(None, None, 0.0), 0.0) == []


def test_admit_takes_a_request_and_refuses_with_retry_after_when_empty() -> None:
    key = principal(2, None, now=-1e6)  # created long ago: full now
    assert dict(key.admit())[b"x-ratelimit-remaining-requests"] in (b"1", b"2")
    key.admit()
    with pytest.raises(RateLimited) as refused:
        key.admit()
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
