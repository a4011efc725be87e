"""Routing by model, what is forwarded, /v1/models merging and every error status, over real sockets."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import httpx
import pytest

from gateway.fleet.registry import BackendSpec
from tests.gateway.echo_upstream import echo_app, forwarded_headers
from tests.gateway.proxy.test_request_body import BOUNDARY, CONTENT_TYPE, multipart
from tests.servers import GatewayServer, ThreadedServer, free_port, gateway, wait_until


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    with (
        ThreadedServer(echo_app(["chat-a", "shared"])) as a,
        ThreadedServer(echo_app(["chat-b", "shared", "whisper"])) as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def gw(upstreams: tuple[ThreadedServer, ThreadedServer]) -> Iterator[GatewayServer]:
    os.environ["TEST_UPSTREAM_KEY"] = "sk-backend"
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "backends": [
            {"url": upstreams[0].url, "api_key_env": "TEST_UPSTREAM_KEY"},
            {"url": upstreams[1].url},
            {"url": dead},
        ],
        "max_body_bytes": 1_000_000,
        "model_refresh_interval": 0.2,
    }
    with GatewayServer(config) as server:
        yield server


def post(gw: GatewayServer, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(gw.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_routes_by_model_to_the_backend_serving_it(gw: GatewayServer, upstreams: tuple[ThreadedServer, ...]) -> None:
    a = post(gw, "/v1/chat/completions", json={"model": "chat-a"})
    b = post(gw, "/v1/completions", json={"model": "chat-b"})
    assert a.status_code == b.status_code == 200
    assert forwarded_headers(a)["host"].endswith(str(upstreams[0].port))
    assert forwarded_headers(b)["host"].endswith(str(upstreams[1].port))
    assert a.json()["path"] == "/v1/chat/completions"


def test_body_is_forwarded_byte_for_byte(gw: GatewayServer) -> None:
    raw = b'{ "z": 1,\n  "model" : "chat-a",  "messages": [ {"content": "h\\u00e9llo \xe2\x98\x83"} ] }'
    response = post(gw, "/v1/chat/completions?x=1&y=%20", content=raw, headers={"content-type": "application/json"})
    assert response.json()["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert response.json()["query"] == "x=1&y=%20"


def test_headers_forwarded_and_filtered(gw: GatewayServer) -> None:
    response = post(
        gw,
        "/v1/chat/completions",
        json={"model": "chat-a"},
        headers={
            "Authorization": "Bearer client-secret",
            "X-Request-Id": "req-123",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Proxy-Authorization": "Basic x",
            "X-Custom": "kept",
            "Accept-Encoding": "gzip, br",
        },
    )
    seen = forwarded_headers(response)
    assert seen["accept-encoding"] == "identity"  # the gateway reads the answers: asked for unencoded
    assert seen["authorization"] == "Bearer sk-backend"  # the backend's key, never the client's
    assert seen["x-request-id"] == "req-123"
    assert seen["traceparent"].startswith("00-0af7651916cd43dd")
    assert seen["x-custom"] == "kept"
    for hop in ("x-hop", "proxy-authorization", "connection", "keep-alive"):
        assert hop not in seen
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-upstream"] == "echo"
    assert "keep-alive" not in response.headers


def test_client_key_not_forwarded_when_backend_has_none(gw: GatewayServer) -> None:
    response = post(gw, "/v1/chat/completions", json={"model": "chat-b"}, headers={"Authorization": "Bearer c"})
    assert "authorization" not in forwarded_headers(response)


def test_request_id_generated_when_absent_or_invalid(gw: GatewayServer) -> None:
    response = post(gw, "/v1/chat/completions", json={"model": "chat-a"}, headers={"X-Request-Id": "bad id"})
    generated = response.headers["x-request-id"]
    assert len(generated) == 32
    assert generated != "bad id"
    assert forwarded_headers(response)["x-request-id"] == generated


@pytest.mark.parametrize(
    "path",
    [
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/score",
        "/v1/rerank",
        "/v2/rerank",
        "/score",
        "/rerank",
        "/pooling",
        "/classify",
        "/tokenize",
        "/detokenize",
    ],
)
def test_every_json_route_is_proxied(gw: GatewayServer, path: str) -> None:
    response = post(gw, path, json={"model": "chat-b"})
    assert response.status_code == 200
    echo = response.json()
    assert echo.get("echo", echo)["path"] == path  # /v1/responses wraps the echo in a response object


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_multipart_routed_by_form_field(gw: GatewayServer, path: str) -> None:
    body = multipart(("file", b"\x00\x01RIFF" * 100), ("model", b"whisper"))
    response = post(gw, path, content=body, headers={"content-type": CONTENT_TYPE.decode()})
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert BOUNDARY.decode() in forwarded_headers(response)["content-type"]


def test_models_merged_over_healthy_backends(gw: GatewayServer) -> None:
    data = httpx.get(gw.url + "/v1/models").json()
    assert data["object"] == "list"
    assert [card["id"] for card in data["data"]] == ["chat-a", "chat-b", "shared", "whisper"]  # one card per id
    assert httpx.get(gw.url + "/v1/models/shared").json()["id"] == "shared"
    missing = httpx.get(gw.url + "/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The model `nope` does not exist."


def test_shared_model_spreads_over_both_backends(gw: GatewayServer, upstreams: tuple[ThreadedServer, ...]) -> None:
    hosts = {forwarded_headers(post(gw, "/v1/chat/completions", json={"model": "shared"}))["host"] for _ in range(30)}
    assert hosts == {f"127.0.0.1:{u.port}" for u in upstreams}


def test_health_ready_metrics(gw: GatewayServer) -> None:
    assert httpx.get(gw.url + "/health").status_code == 200
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200
    assert "chat-a" in ready.json()["models"]
    post(gw, "/v1/chat/completions", json={"model": "chat-a"})
    text = httpx.get(gw.url + "/metrics").text
    assert 'switchyard_requests_total{code="200",model="chat-a",route="/v1/chat/completions"}' in text
    assert "switchyard_request_duration_seconds_bucket" in text
    assert 'switchyard_inflight_requests{backend="' in text
    dead = gw.registry.backends[2].url
    assert f'switchyard_backend_up{{backend="{dead}"}} 0.0' in text
    assert f'switchyard_backend_models{{backend="{dead}"}} 0.0' in text


def assert_error(response: httpx.Response, status: int, message: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert response.headers["content-type"] == "application/json"
    return dict(error)


def test_invalid_json_400(gw: GatewayServer) -> None:
    assert_error(post(gw, "/v1/chat/completions", content=b'{"model": '), 400, "not valid JSON")


def test_missing_model_with_several_served_400(gw: GatewayServer) -> None:
    error = assert_error(post(gw, "/v1/chat/completions", json={"messages": []}), 400, "`model` is required")
    assert error["param"] == "model"


def test_unknown_model_404(gw: GatewayServer) -> None:
    error = assert_error(
        post(gw, "/v1/chat/completions", json={"model": "gpt-9"}), 404, "The model `gpt-9` does not exist."
    )
    assert error["param"] == "model"


def test_body_over_limit_413(gw: GatewayServer) -> None:
    big = b'{"model": "chat-a", "x": "' + b"a" * 1_100_000 + b'"}'
    assert_error(post(gw, "/v1/chat/completions", content=big), 413, "exceeds the limit")


def test_chunked_body_over_limit_413(gw: GatewayServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "chat-a", "x": "'
        for _ in range(20):
            yield b"a" * 100_000
        yield b'"}'

    assert_error(post(gw, "/v1/chat/completions", content=chunks()), 413, "exceeds the limit")


def test_unknown_path_under_v1_404(gw: GatewayServer) -> None:
    assert_error(httpx.get(gw.url + "/v1/nothing/here"), 404, "No route matches GET /v1/nothing/here")
    assert_error(post(gw, "/v1/chat/completion", json={}), 404, "No route matches")


def test_wrong_method_405(gw: GatewayServer) -> None:
    assert_error(httpx.get(gw.url + "/v1/chat/completions"), 405, "GET is not allowed")


def test_multipart_without_boundary_400(gw: GatewayServer) -> None:
    response = post(gw, "/v1/audio/transcriptions", content=b"x", headers={"content-type": "multipart/form-data"})
    assert_error(response, 400, "no boundary")


def test_only_model_used_when_model_omitted() -> None:
    with ThreadedServer(echo_app(["solo"])) as upstream, gateway(upstream.url) as gw:
        response = post(gw, "/v1/chat/completions", json={"messages": []})
        assert response.status_code == 200
        assert response.json()["path"] == "/v1/chat/completions"


def test_known_model_without_healthy_backend_503_then_unknown_after_removal() -> None:
    upstream = ThreadedServer(echo_app(["fragile"]))
    with upstream, gateway(upstream.url) as gw:
        assert post(gw, "/v1/chat/completions", json={"model": "fragile"}).status_code == 200
        upstream.__exit__(None, None, None)  # the backend goes away; its model stays known
        wait_until(lambda: not gw.registry.ready(), 10, what="backend marked down")
        response = post(gw, "/v1/chat/completions", json={"model": "fragile"})
        assert_error(response, 503, "No healthy backend serves the model `fragile`")
        assert response.headers["retry-after"] == "1"
        assert httpx.get(gw.url + "/ready").status_code == 503
        assert httpx.get(gw.url + "/v1/models").json()["data"] == []  # answers even with every backend down


def test_a_model_whose_last_backend_left_is_unavailable_not_unknown() -> None:
    """Kubernetes replaces a model's only pod: the old endpoint leaves before the new one serves. Meanwhile the
    model's requests are unavailable (503, retry later) and its series reads 0 for the alerts: a 404 "does not
    exist" would tell clients to give up, and the series would vanish."""
    old, new = ThreadedServer(echo_app(["solo"])), ThreadedServer(echo_app(["solo"]))
    with old, new, gateway(old.url) as gw:
        assert post(gw, "/v1/chat/completions", json={"model": "solo"}).status_code == 200
        gw.registry.reconcile([])  # the old pod's endpoint is deleted
        response = post(gw, "/v1/chat/completions", json={"model": "solo"})
        assert_error(response, 503, "No healthy backend serves the model `solo`")
        assert 'switchyard_model_backends{model="solo"} 0.0' in httpx.get(gw.url + "/metrics").text
        assert_error(post(gw, "/v1/chat/completions", json={"model": "never"}), 404, "`never` does not exist")
        gw.registry.reconcile([BackendSpec(new.url)])  # its successor, at another address
        wait_until(lambda: post(gw, "/v1/chat/completions", json={"model": "solo"}).status_code == 200, 10)
        assert 'switchyard_model_backends{model="solo"} 1.0' in httpx.get(gw.url + "/metrics").text


def test_unreachable_backend_between_polls_502() -> None:
    upstream = ThreadedServer(echo_app(["gone"]))
    with upstream, gateway(upstream.url, model_refresh_interval=60) as gw:
        upstream.__exit__(None, None, None)  # dies right after the poll: the registry still calls it healthy
        response = post(gw, "/v1/chat/completions", json={"model": "gone"})
        assert_error(response, 502, "could be reached")


def test_unreachable_backend_falls_over_to_another() -> None:
    doomed, survivor = ThreadedServer(echo_app(["m"])), ThreadedServer(echo_app(["m"]))
    with doomed, survivor, gateway(doomed.url, survivor.url, model_refresh_interval=60) as gw:
        doomed.__exit__(None, None, None)
        for _ in range(6):  # least-inflight would pick the dead one about half the time
            response = post(gw, "/v1/chat/completions", json={"model": "m"})
            assert response.status_code == 200
            assert forwarded_headers(response)["host"] == f"127.0.0.1:{survivor.port}"
        text = httpx.get(gw.url + "/metrics").text
        assert f'switchyard_upstream_errors_total{{backend="{doomed.url}",kind="connect"}}' in text
