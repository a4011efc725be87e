"""Responses API objects live on one server: follow-ups, GET and cancel must reach it, from any replica."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.echo_upstream import echo_app, received_headers
from tests.servers import ThreadedServer, gateway


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
