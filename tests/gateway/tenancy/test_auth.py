"""Client API keys, per-key model access and rate limits, request-size limits."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.errors import RateLimited, Unauthorized
from gateway.settings import AuthSettings
from gateway.tenancy.auth import KeyRing
from tests.gateway.echo_upstream import echo_app, forwarded_headers
from tests.servers import GatewayServer, ThreadedServer, gateway, wait_until

KEYS = [
    {"name": "team-a", "key": "sk-team-a-0123456789", "models": ["chat-*"]},
    {"name": "ops", "key": "sk-ops-0123456789", "models": ["*"], "requests_per_minute": 3},
]


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayServer]:
    with (
        ThreadedServer(echo_app(["chat-small", "embed-large"])) as upstream,
        gateway(upstream.url, auth={"keys": KEYS}) as server,
    ):
        yield server


def call(
    gw: GatewayServer, key: str | None, model: str = "chat-small", path: str = "/v1/completions"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + path, json={"model": model, "prompt": "x"}, headers=headers)


def test_missing_or_wrong_key_401(gw: GatewayServer) -> None:
    for response in (call(gw, None), call(gw, "sk-team-a-012345678"), call(gw, "sk-team-a-0123456789x")):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    basic = httpx.post(gw.url + "/v1/completions", json={}, headers={"Authorization": "Basic c2stdGVhbS1h"})
    assert basic.status_code == 401


def test_valid_key_reaches_the_backend_without_the_client_key(gw: GatewayServer) -> None:
    response = call(gw, "sk-team-a-0123456789")
    assert response.status_code == 200
    assert "authorization" not in forwarded_headers(response)


def test_model_outside_the_keys_patterns_is_unknown(gw: GatewayServer) -> None:
    response = call(gw, "sk-team-a-0123456789", model="embed-large")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `embed-large` does not exist."
    assert call(gw, "sk-team-a-0123456789", model="nope").json() == response.json() | {
        "error": response.json()["error"] | {"message": "The model `nope` does not exist."}
    }


def test_models_list_shows_only_allowed_models(gw: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-team-a-0123456789", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["chat-small"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("embed-large")
    assert httpx.get(gw.url + "/v1/models").status_code == 401
    ops = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-ops-0123456789", max_retries=0)
    assert [m.id for m in ops.models.list().data] == ["chat-small", "embed-large"]


def test_request_rate_limit_429_with_headers(gw: GatewayServer) -> None:
    answers = [call(gw, "sk-ops-0123456789") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "2"
    limited = answers[3]
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    text = httpx.get(gw.url + "/metrics").text
    assert 'switchyard_rejected_requests_total{model="chat-small",reason="rate_limit"} 1.0' in text


def test_keys_never_logged(gw: GatewayServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        call(gw, "sk-team-a-0123456789")
        call(gw, "sk-wrong-key-999")
    assert "sk-team-a" not in caplog.text
    assert "sk-wrong-key" not in caplog.text


def test_token_rate_limit_charges_reported_usage() -> None:
    from tests.servers import running_sims, sim

    keys = [{"name": "small", "key": "sk-small-0123456789", "tokens_per_minute": 40}]
    with running_sims(sim("m")) as (upstream,), gateway(upstream.url, auth={"keys": keys}) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-small-0123456789", max_retries=0)
        client.completions.create(model="m", prompt="a long enough prompt to cost tokens", max_tokens=40)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="m", prompt="again", max_tokens=1)


def test_a_request_refused_for_tokens_takes_no_request() -> None:
    """A key out of tokens is refused without spending its requests: once its tokens come back, its
    requests per minute are all there."""
    settings = AuthSettings(
        keys=[{"name": "k", "key": "sk-k-0123456789", "requests_per_minute": 5, "tokens_per_minute": 50}]
    )
    principal = KeyRing(settings).authenticate(scope_with(b"Bearer sk-k-0123456789"))
    assert dict(principal.admit())[b"x-ratelimit-remaining-requests"] == b"4"
    principal.charge_tokens(100)
    for _ in range(3):
        with pytest.raises(RateLimited, match="tokens per minute") as refused:
            principal.admit()
        assert refused.value.headers["x-ratelimit-remaining-requests"] == "4"


def test_keys_from_a_mounted_file(tmp_path: Path) -> None:
    secret = tmp_path / "keys.yaml"
    secret.write_text("keys:\n  - name: mounted\n    key: sk-mounted-0123456789\n")
    with ThreadedServer(echo_app(["m"])) as upstream, gateway(upstream.url, auth={"keys_file": str(secret)}) as gw:
        assert call(gw, "sk-mounted-0123456789", model="m").status_code == 200
        assert call(gw, "sk-other", model="m").status_code == 401


def test_header_and_depth_limits() -> None:
    limits = {"max_header_count": 20, "max_header_bytes": 2000, "max_json_depth": 8}
    with ThreadedServer(echo_app(["m"])) as upstream, gateway(upstream.url, limits=limits) as gw:
        many = {f"x-h{i}": "1" for i in range(30)}
        assert httpx.post(gw.url + "/v1/completions", json={"model": "m"}, headers=many).status_code == 431
        big = {"x-big": "a" * 3000}
        assert httpx.post(gw.url + "/v1/completions", json={"model": "m"}, headers=big).status_code == 431
        deep: object = "x"
        for _ in range(10):
            deep = [deep]
        response = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": deep})
        assert response.status_code == 400
        assert "deeper than 8" in response.json()["error"]["message"]
        flat_but_many = {"model": "m", "prompt": [[1], [2], [3], [4], [5], [6], [7], [8], [9], [10]]}
        assert httpx.post(gw.url + "/v1/completions", json=flat_but_many).status_code == 200


def key_ring() -> KeyRing:
    return KeyRing(AuthSettings.model_validate({"keys": [{"name": k["name"], "key": k["key"]} for k in KEYS]}))


def scope_with(value: bytes) -> dict[str, object]:
    return {"headers": [(b"host", b"gw"), (b"authorization", value)]}


def test_a_key_is_known_in_any_spelling_of_its_header_and_a_guess_is_not() -> None:
    ring = key_ring()
    for value in (b"Bearer sk-ops-0123456789", b"bearer sk-ops-0123456789", b"Bearer  sk-ops-0123456789 "):
        for _ in range(2):  # the second time from what the first one learned
            assert ring.authenticate(scope_with(value)).name == "ops"
    for value in (b"Bearer sk-ops-012345678", b"Basic sk-ops-0123456789", b"sk-ops-0123456789", b"Bearer "):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                ring.authenticate(scope_with(value))


def test_guesses_leave_nothing_behind() -> None:
    ring = key_ring()
    ring.authenticate(scope_with(b"Bearer sk-team-a-0123456789"))
    for guess in range(10_000):
        with pytest.raises(Unauthorized):
            ring.authenticate(scope_with(b"Bearer sk-guess-%d" % guess))
    assert len(ring._known) == 1  # only the header value that authenticated is remembered


def test_an_x_api_key_authenticates_and_no_client_key_reaches_the_backend(gw: GatewayServer) -> None:
    """Anthropic's SDK sends its key as `x-api-key` (Azure's as `api-key`): it authenticates like a Bearer key,
    and neither header is forwarded, whatever the client sends."""
    body = {"model": "chat-small", "prompt": "x"}
    response = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": "sk-team-a-0123456789"})
    assert response.status_code == 200
    assert "x-api-key" not in forwarded_headers(response)
    wrong = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": "sk-team-a-wrong"})
    assert wrong.status_code == 401
    assert httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": ""}).status_code == 401
    both = {"Authorization": "Bearer sk-team-a-0123456789", "x-api-key": "sk-secret", "api-key": "sk-azure"}
    forwarded = forwarded_headers(httpx.post(gw.url + "/v1/completions", json=body, headers=both))
    assert not {"authorization", "x-api-key", "api-key"} & forwarded.keys()


def test_a_key_reaches_only_responses_on_backends_of_its_models() -> None:
    """GET /v1/responses/{id} and its cancel are routed by the id, not a model: a key must not reach a
    response held by a backend of a model it may not use (it is not found, as the model would not be)."""
    keys = [{"name": "a", "key": "sk-a-0123456789", "models": ["chat-*"]}, {"name": "b", "key": "sk-b-0123456789"}]
    with (
        ThreadedServer(echo_app(["chat-small"])) as chat,
        ThreadedServer(echo_app(["private"])) as private,
        gateway(chat.url, private.url, auth={"keys": keys}) as gw,
    ):
        b = {"Authorization": "Bearer sk-b-0123456789"}
        a = {"Authorization": "Bearer sk-a-0123456789"}
        created = httpx.post(gw.url + "/v1/responses", json={"model": "private", "input": "x"}, headers=b).json()
        mine = httpx.post(gw.url + "/v1/responses", json={"model": "chat-small", "input": "x"}, headers=a).json()
        assert httpx.get(f"{gw.url}/v1/responses/{created['id']}", headers=b).status_code == 200
        assert httpx.get(f"{gw.url}/v1/responses/{created['id']}", headers=a).status_code == 404
        assert httpx.post(f"{gw.url}/v1/responses/{created['id']}/cancel", headers=a).status_code == 404
        assert httpx.get(f"{gw.url}/v1/responses/{mine['id']}", headers=a).status_code == 200


def test_a_stream_asked_for_with_a_non_boolean_true_is_charged_too() -> None:
    """vLLM reads `"stream": 1` (or "true", "yes") as a stream: the gateway counts its tokens as it does any
    stream's, so it cannot pass a key's token limit uncounted."""
    from tests.servers import running_sims, sim

    keys = [{"name": "small", "key": "sk-small-0123456789", "tokens_per_minute": 40}]
    with running_sims(sim("m")) as (upstream,), gateway(upstream.url, auth={"keys": keys}) as gw:
        headers = {"Authorization": "Bearer sk-small-0123456789"}
        body = {"model": "m", "prompt": "a long enough prompt to cost tokens", "max_tokens": 40, "stream": 1}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=headers, timeout=30) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            text = "".join(answer.iter_text())
        assert '"usage"' not in text  # the client asked for none: the gateway's own request for it is hidden
        assert text.rstrip().endswith("data: [DONE]")
        refused = httpx.post(gw.url + "/v1/completions", json={**body, "stream": "true"}, headers=headers)
        assert refused.status_code == 429


def test_a_stream_left_before_its_usage_is_charged_what_the_gateway_knows() -> None:
    """The gateway hides the usage event it asked for: a client could read every token, hang up before that
    event and pay nothing against its token limit. It is charged the prompt as routing estimated it and the
    content it received."""
    from tests.servers import running_sims, sim

    keys = [{"name": "small", "key": "sk-small-0123456789", "tokens_per_minute": 60}]
    with running_sims(sim("m")) as (upstream,), gateway(upstream.url, auth={"keys": keys}) as gw:
        headers = {"Authorization": "Bearer sk-small-0123456789"}
        prompt = "a prompt long enough to cost many tokens " * 12  # ~500 characters: ~100 tokens estimated
        body = {"model": "m", "prompt": prompt, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=headers, timeout=30) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("data: {"):
                    break  # the first content event: hang up, long before the usage
        wait_until(lambda: 'code="499"' in httpx.get(gw.url + "/metrics").text, 5, what="the hang-up accounted for")
        after = httpx.post(
            gw.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}, headers=headers
        )
        assert after.status_code == 429
        assert "tokens per minute" in after.json()["error"]["message"]
