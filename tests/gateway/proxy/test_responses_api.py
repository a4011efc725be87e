"""Responses API objects live on one server: follow-ups, GET and cancel must reach it, from any replica."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.gateway.echo_upstream import Behaviour, echo_app, received_headers
from tests.servers import ThreadedServer, gateway, wait_until


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    with ThreadedServer(echo_app(["m"])) as a, ThreadedServer(echo_app(["m"])) as b:
        yield a, b


def create(url: str) -> tuple[str, int]:
    created = httpx.post(url + "/v1/responses", json={"model": "m", "input": "hi"}).json()
    host = received_headers(created["echo"])["host"]
    return created["id"], int(host.rsplit(":", 1)[1])


def test_follow_ups_get_and_cancel_reach_the_owner(upstreams: tuple[ThreadedServer, ThreadedServer]) -> None:
    with gateway(*(u.url for u in upstreams)) as gw:
        response_id, owner = create(gw.url)
        for _ in range(8):  # least-inflight alone would alternate between the two servers
            follow_up = httpx.post(
                gw.url + "/v1/responses", json={"model": "m", "input": "more", "previous_response_id": response_id}
            )
            assert follow_up.status_code == 200
            assert received_headers(follow_up.json()["echo"])["host"].endswith(f":{owner}")
        fetched = httpx.get(f"{gw.url}/v1/responses/{response_id}")
        assert fetched.status_code == 200
        assert fetched.json()["server_port"] == owner
        cancelled = httpx.post(f"{gw.url}/v1/responses/{response_id}/cancel")
        assert cancelled.json()["server_port"] == owner


def test_another_replica_finds_the_owner_without_shared_state(
    upstreams: tuple[ThreadedServer, ThreadedServer],
) -> None:
    urls = [u.url for u in upstreams]
    with gateway(*urls) as first, gateway(*urls) as second:
        response_id, owner = create(first.url)
        assert httpx.get(f"{second.url}/v1/responses/{response_id}").json()["server_port"] == owner
        follow_up = httpx.post(
            second.url + "/v1/responses", json={"model": "m", "input": "x", "previous_response_id": response_id}
        )
        assert received_headers(follow_up.json()["echo"])["host"].endswith(f":{owner}")


def test_unknown_response_id_404(upstreams: tuple[ThreadedServer, ThreadedServer]) -> None:
    with gateway(*(u.url for u in upstreams)) as gw:
        missing = httpx.get(f"{gw.url}/v1/responses/resp_nobody_has_this")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "response_not_found"
        follow_up = httpx.post(
            gw.url + "/v1/responses", json={"model": "m", "input": "x", "previous_response_id": "resp_gone"}
        )
        assert follow_up.status_code == 404


def test_a_response_whose_server_is_out_of_reach_is_unavailable_not_missing() -> None:
    """404 tells a client the response is gone for good. While the server holding it is failing its health
    checks, the answer is 503 with Retry-After: it may come back."""
    behaviours = [Behaviour(), Behaviour()]
    with ThreadedServer(echo_app(["m"], behaviours[0])) as a, ThreadedServer(echo_app(["m"], behaviours[1])) as b:
        config = {"health": {"interval": 0.1, "unhealthy_threshold": 1, "healthy_threshold": 1}}
        with gateway(a.url, b.url, **config) as gw:
            response_id, owner = create(gw.url)
            holder = a if owner == a.port else b
            sick = behaviours[0] if holder is a else behaviours[1]
            backend = next(x for x in gw.registry.backends if x.url == holder.url)
            sick.health_status = 503
            wait_until(lambda: not backend.live, 5, what="the holder out of service")
            unavailable = httpx.get(f"{gw.url}/v1/responses/{response_id}")
            assert unavailable.status_code == 503
            assert unavailable.headers["retry-after"]
            assert unavailable.json()["error"]["code"] == "no_healthy_backend"
            assert httpx.get(f"{gw.url}/v1/responses/resp_nobody_has_this").status_code == 404
            sick.health_status = 200
            wait_until(lambda: backend.live, 5, what="the holder back")
            assert httpx.get(f"{gw.url}/v1/responses/{response_id}").json()["server_port"] == owner


def test_a_server_that_cannot_say_makes_an_unknown_response_unavailable_not_missing() -> None:
    """A gateway that did not see the response made asks every server; one that fails to answer may hold it."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "parent": None}]})

    async def broken(request: Request) -> Response:
        return JSONResponse({"error": {"message": "engine dead"}}, status_code=500)

    failing = Starlette(
        routes=[Route("/v1/models", models), Route("/health", models), Route("/v1/responses/{rid}", broken)]
    )
    with ThreadedServer(echo_app(["m"])) as a, ThreadedServer(failing) as b, gateway(a.url, b.url) as gw:
        unknown = httpx.get(f"{gw.url}/v1/responses/resp_made_elsewhere")
        assert unknown.status_code == 503
        assert unknown.headers["retry-after"]
