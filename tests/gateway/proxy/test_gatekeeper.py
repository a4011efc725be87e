"""The proxy's first stage on its own: what a request must pass before it may go upstream, in order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import orjson
import pytest

from gateway.errors import (
    GatewayError,
    HeadersTooLarge,
    ModelNotFound,
    ModelRequired,
    NoHealthyBackend,
    RateLimited,
    Unauthorized,
)
from gateway.fleet.registry import BackendSpec, Registry
from gateway.metrics import NO_MODEL, UNKNOWN_MODEL, Metrics
from gateway.proxy.exchange import Exchange
from gateway.proxy.gatekeeper import Gatekeeper
from gateway.proxy.outcome import Outcome
from gateway.proxy.request_body import BodyKind
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.upstream import UpstreamPool
from gateway.routing.admission import Admission
from gateway.settings import load_settings
from gateway.tenancy.auth import KeyRing

KEY = "sk-gatekeeper-test"


@pytest.fixture
def key_env() -> Iterator[str]:
    os.environ["GATEKEEPER_TEST_KEY"] = KEY
    yield "GATEKEEPER_TEST_KEY"
    del os.environ["GATEKEEPER_TEST_KEY"]


def build(**config: Any) -> tuple[Gatekeeper, Registry, Metrics]:
    settings = load_settings(None, backends=[{"url": "http://a:8000"}, {"url": "http://b:8000"}], **config)
    registry = Registry()
    registry.reconcile([BackendSpec("http://a:8000"), BackendSpec("http://b:8000")])
    a, b = registry.backends
    registry.set_models(a, [{"id": "chat"}, {"id": "embed"}])
    registry.set_models(b, [{"id": "chat"}])
    metrics = Metrics(registry)
    admission = Admission(settings.admission, registry, metrics)
    responses = ResponseDirectory(UpstreamPool(1.0, 1.0))
    return Gatekeeper(settings, KeyRing(settings.auth), registry, admission, responses), registry, metrics


def exchange(body: dict[str, Any] | bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Exchange:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("the gatekeeper answers nothing itself")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json"), *(headers or [])],
        "client": ("10.1.2.3", 5000),
    }
    return Exchange(scope, receive, send, "/v1/chat/completions", BodyKind.JSON, Outcome(b"req-1", perf_counter()))


async def test_a_good_request_leaves_with_its_body_view_and_candidates() -> None:
    gatekeeper, registry, _ = build()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ex = exchange(body)
    await gatekeeper.check(ex)
    assert ex.label == "chat"
    assert ex.body == orjson.dumps(body)
    assert [b.url for b in ex.candidates] == [b.url for b in registry.candidates("chat")]
    assert ex.info.model == "chat"
    assert ex.info.tenant == "10.1.2.3"
    assert ex.info.headers == {}  # routing reads only its session and priority headers
    assert ex.hide_usage  # a stream that did not ask for usage


async def check_fails(gatekeeper: Gatekeeper, ex: Exchange, error: type[GatewayError]) -> GatewayError:
    with pytest.raises(error) as caught:
        await gatekeeper.check(ex)
    return caught.value


async def test_failures_come_in_order_and_label_the_metrics_as_far_as_known(key_env: str) -> None:
    gatekeeper, _, _ = build(limits={"max_header_count": 3})
    ex = exchange({"model": "chat"}, [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")])
    await check_fails(gatekeeper, ex, HeadersTooLarge)  # before the key is even looked at
    assert ex.label == NO_MODEL

    keyed, _, _ = build(auth={"keys": [{"name": "team", "key_env": key_env, "models": ["chat"]}]})
    await check_fails(keyed, exchange({"model": "chat"}), Unauthorized)  # before the body is read
    bearer = [(b"authorization", f"Bearer {KEY}".encode())]
    ex = exchange({"model": "embed"}, bearer)
    await check_fails(keyed, ex, ModelNotFound)  # a model the key may not use does not exist for it
    assert ex.label == UNKNOWN_MODEL
    ex = exchange({"messages": []}, bearer)
    await keyed.check(ex)  # no model: the only one this key may use
    assert ex.label == "chat"
    assert ex.info.tenant == "team"


async def test_no_model_with_several_served_is_a_400_and_an_unserved_one_a_503() -> None:
    gatekeeper, registry, _ = build()
    await check_fails(gatekeeper, exchange({"messages": []}), ModelRequired)
    a, _ = registry.backends
    registry.mark_down(a, "test")
    error = await check_fails(gatekeeper, exchange({"model": "embed"}), NoHealthyBackend)
    assert error.headers["Retry-After"] == "1"


async def test_rate_limits_are_counted_as_rejections_once(key_env: str) -> None:
    keys = [{"name": "team", "key_env": key_env, "requests_per_minute": 1}]
    gatekeeper, _, metrics = build(auth={"keys": keys})
    bearer = [(b"authorization", f"Bearer {KEY}".encode())]
    await gatekeeper.check(exchange({"model": "chat"}, bearer))
    error = await check_fails(gatekeeper, exchange({"model": "chat"}, bearer), RateLimited)
    assert "Retry-After" in error.headers
    labels = {"model": "chat", "reason": "rate_limit"}
    assert metrics.registry.get_sample_value("switchyard_rejected_requests_total", labels) == 1.0
