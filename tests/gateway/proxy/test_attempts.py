"""The attempts stage against real servers: what a request that waited for a slot is sent to."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.gateway.echo_upstream import Behaviour, echo_app, received_headers
from tests.gateway.scripted_upstream import Script, scripted_app
from tests.servers import ThreadedServer, gateway, wait_until


@pytest.fixture
def admin_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_ATTEMPTS_ADMIN_KEY", "admin-secret-2")
    return "admin-secret-2"


def test_a_request_that_waited_goes_only_to_backends_still_routable(admin_key: str) -> None:
    """Requests wait for the one slot while a backend of their model goes down: when their turn comes they are
    routed among the backends routable then, not those of when they arrived."""
    release = threading.Event()
    holding = Script([b"data: [DONE]\n\n"], gates={0: release})
    survivor, failing = Behaviour(), Behaviour()
    with (
        ThreadedServer(scripted_app("long", holding)) as hold,
        ThreadedServer(echo_app(["m"], survivor)) as a,
        ThreadedServer(echo_app(["m"], failing)) as b,
        gateway(
            hold.url,
            a.url,
            b.url,
            admission={"max_inflight": 1, "queue_timeout": 20},
            health={"interval": 0.1, "unhealthy_threshold": 1},
            routing={"policy": "round_robin"},
            admin={"key_env": "TEST_ATTEMPTS_ADMIN_KEY"},
        ) as gw,
    ):
        wait_until(lambda: len(gw.registry.candidates("m")) == 2 and gw.registry.candidates("long"), 10)
        long = {"model": "long", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        holder = threading.Thread(target=lambda: httpx.post(gw.url + "/v1/chat/completions", json=long, timeout=20))
        holder.start()
        wait_until(lambda: len(holding.requests) == 1, 10, what="the slot taken")
        answers: list[httpx.Response] = []

        def ask() -> None:
            body = {"model": "m", "prompt": "x"}
            answers.append(httpx.post(gw.url + "/v1/completions", json=body, timeout=20))

        askers = [threading.Thread(target=ask) for _ in range(4)]
        for thread in askers:
            thread.start()
        fleet = {"Authorization": f"Bearer {admin_key}"}
        waiting = lambda: httpx.get(gw.url + "/admin/fleet", headers=fleet).json()["gateway"]["waiting"]  # noqa: E731
        wait_until(lambda: waiting() == 4, 10, what="four requests queued")
        failing.health_status = 503
        wait_until(lambda: [backend.url for backend in gw.registry.candidates("m")] == [a.url], 10, what="b down")
        release.set()
        for thread in [holder, *askers]:
            thread.join(20)
    assert [answer.status_code for answer in answers] == [200] * 4
    ports = {received_headers(answer.json())["host"].rsplit(":", 1)[1] for answer in answers}
    assert ports == {a.url.rsplit(":", 1)[1]}
