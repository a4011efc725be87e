"""Active health checks and passive outlier ejection keep requests away from sick backends."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.fleet.health import HealthChecker
from gateway.fleet.registry import BackendSpec, Registry
from gateway.settings import HealthSettings
from tests.gateway.echo_upstream import Behaviour, echo_app, forwarded_headers
from tests.servers import ThreadedServer, gateway, wait_until


def port_of(response: httpx.Response) -> int:
    host = forwarded_headers(response)["host"]
    return int(host.rsplit(":", 1)[1])


def test_failing_health_check_takes_a_backend_out_and_back_in() -> None:
    sick = Behaviour()
    a, b = ThreadedServer(echo_app(["m"], sick)), ThreadedServer(echo_app(["m"]))
    config = {"health": {"interval": 0.1, "unhealthy_threshold": 2, "healthy_threshold": 1}}
    with a, b, gateway(a.url, b.url, **config) as gw:
        sick.health_status = 503  # its engine died; /v1/models still answers
        backend_a = next(x for x in gw.registry.backends if x.url == a.url)
        wait_until(lambda: not backend_a.live, 5, what="health checks to fail")
        ports = {port_of(httpx.post(gw.url + "/v1/completions", json={"model": "m"})) for _ in range(10)}
        assert ports == {b.port}
        assert 'switchyard_model_backends{model="m"} 1.0' in httpx.get(gw.url + "/metrics").text
        assert gw.registry.candidates("m") == tuple(x for x in gw.registry.backends if x.url == b.url)
        text = httpx.get(gw.url + "/metrics").text
        assert f'switchyard_backend_up{{backend="{a.url}"}} 0.0' in text
        sick.health_status = 200
        wait_until(lambda: backend_a.live, 5, what="health checks to pass again")
        ports = {port_of(httpx.post(gw.url + "/v1/completions", json={"model": "m"})) for _ in range(20)}
        assert ports == {a.port, b.port}


def test_all_backends_failing_health_makes_the_gateway_unready() -> None:
    sick = Behaviour()
    upstream = ThreadedServer(echo_app(["m"], sick))
    with upstream, gateway(upstream.url, health={"interval": 0.1}) as gw:
        assert httpx.get(gw.url + "/ready").status_code == 200
        sick.health_status = 500
        wait_until(lambda: httpx.get(gw.url + "/ready").status_code == 503, 5, what="unready")
        assert httpx.get(gw.url + "/v1/models").json()["data"] == []
        response = httpx.post(gw.url + "/v1/completions", json={"model": "m"})
        assert response.status_code == 503
        assert 'switchyard_model_backends{model="m"} 0.0' in httpx.get(gw.url + "/metrics").text


def test_5xx_answers_eject_a_backend_and_are_retried() -> None:
    broken = Behaviour(answer_status=503)
    a, b = ThreadedServer(echo_app(["m"], broken)), ThreadedServer(echo_app(["m"]))
    config = {"health": {"interval": 60, "eject_after": 3, "eject_base": 0.5}}
    with a, b, gateway(a.url, b.url, **config) as gw:
        for _ in range(12):  # every 503 is retried on the healthy backend: clients see no failure
            response = httpx.post(gw.url + "/v1/completions", json={"model": "m"})
            assert response.status_code == 200
            assert port_of(response) == b.port
        backend_a = next(x for x in gw.registry.backends if x.url == a.url)
        assert backend_a.ejections >= 1
        text = httpx.get(gw.url + "/metrics").text
        assert 'switchyard_retries_total{model="m"}' in text
        broken.answer_status = 200
        wait_until(lambda: not backend_a.ejected_until, 3, what="re-admission after the back-off")
        ports = {port_of(httpx.post(gw.url + "/v1/completions", json={"model": "m"})) for _ in range(20)}
        assert a.port in ports


def test_the_last_backend_of_a_model_is_never_ejected() -> None:
    upstream = ThreadedServer(echo_app(["m"], Behaviour(answer_status=503)))
    with upstream, gateway(upstream.url, health={"eject_after": 2}) as gw:
        for _ in range(6):
            response = httpx.post(gw.url + "/v1/completions", json={"model": "m"})
            assert response.status_code == 503  # the backend's own answer, not a gateway-made 502 or 503
            assert response.headers["x-upstream"] == "echo"
        assert gw.registry.backends[0].ejections == 0


def test_retry_budget_stops_a_retry_storm() -> None:
    broken = Behaviour(answer_status=503)
    a, b = ThreadedServer(echo_app(["m"], broken)), ThreadedServer(echo_app(["m"], broken))
    config = {"retries": {"budget_ratio": 0.0}, "health": {"eject_after": 1000}}
    with a, b, gateway(a.url, b.url, **config) as gw:
        for _ in range(30):
            httpx.post(gw.url + "/v1/completions", json={"model": "m"})
        text = httpx.get(gw.url + "/metrics").text
        retries = next(line for line in text.splitlines() if line.startswith('switchyard_retries_total{model="m"}'))
        assert float(retries.rsplit(" ", 1)[1]) <= 10  # the initial allowance; no deposits at ratio 0


async def test_a_backend_re_added_at_the_same_address_starts_its_own_streak() -> None:
    """A new pod that gets a departed pod's IP is a new backend: the old one's failed checks are not its own."""
    sick = Behaviour(health_status=503)
    with ThreadedServer(echo_app(["m"], sick)) as upstream:
        registry = Registry()
        registry.reconcile([BackendSpec(upstream.url)])
        settings = HealthSettings(unhealthy_threshold=2, healthy_threshold=1)
        async with aiohttp.ClientSession() as session:
            checker = HealthChecker(registry, session, settings)
            await checker.check_all()
            assert registry.backends[0].live  # one failure of two
            registry.reconcile([])  # the pod leaves; a new one at the same address arrives before the next round
            registry.reconcile([BackendSpec(upstream.url)])
            await checker.check_all()
            assert registry.backends[0].live, "the new backend was charged the old one's failure"
            await checker.check_all()
            assert not registry.backends[0].live  # its own two failures in a row


def test_a_failing_backend_is_ejected_for_the_models_others_serve_and_kept_for_its_own() -> None:
    """A backend failing every request that alone serves one model (an adapter, say) was never ejected, so
    it kept taking most of the shared model's requests (failing fast, it always looked least busy). Now it
    leaves the shared model's candidates and stays the last resort of its own."""
    broken = Behaviour(answer_status=500)
    a, b = ThreadedServer(echo_app(["m", "only-a"], broken)), ThreadedServer(echo_app(["m"]))
    with a, b, gateway(a.url, b.url, health={"interval": 60, "eject_after": 3, "eject_base": 30}) as gw:
        codes = [httpx.post(gw.url + "/v1/completions", json={"model": "m"}).status_code for _ in range(20)]
        backend_a = next(x for x in gw.registry.backends if x.url == a.url)
        assert backend_a.ejections == 1
        assert codes.count(500) <= 3  # its failures until the ejection, no more
        ports = {port_of(httpx.post(gw.url + "/v1/completions", json={"model": "m"})) for _ in range(10)}
        assert ports == {b.port}
        own = httpx.post(gw.url + "/v1/completions", json={"model": "only-a"})
        assert own.status_code == 500  # still the backend's own answer, not a gateway-made 503
        assert own.headers["x-upstream"] == "echo"
        assert gw.registry.candidates("only-a") == (backend_a,)


def test_requests_waiting_on_a_backend_the_checks_declare_dead_are_tried_elsewhere() -> None:
    """An engine that hangs (its process stopped, say) answers nothing: its requests would wait their whole
    first_byte timeout (15 minutes by default) after health checks found it dead. Those with no response
    byte yet are given up then and tried on another backend, as a connection it closed unanswered would be."""
    health = Behaviour()
    arrived, released = threading.Event(), threading.Event()

    async def hang(request: Request) -> Response:
        arrived.set()
        await asyncio.to_thread(released.wait, 30)  # until the test ends: no answer ever reaches the gateway
        return Response()

    async def alive(request: Request) -> Response:
        return Response(status_code=health.health_status)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model", "parent": None}]})

    hung = Starlette(
        routes=[Route("/health", alive), Route("/v1/models", models), Route("/v1/completions", hang, methods=["POST"])]
    )
    config = {"health": {"interval": 0.1, "unhealthy_threshold": 2}, "timeouts": {"first_byte": 60}}
    with ThreadedServer(hung) as a, ThreadedServer(echo_app(["m"])) as b, gateway(a.url, b.url, **config) as gw:
        answers: list[httpx.Response] = []

        def send() -> None:
            answers.append(httpx.post(gw.url + "/v1/completions", json={"model": "m"}, timeout=60))

        clients = []
        while not arrived.is_set() and len(clients) < 20:  # until one lands on the hung backend
            clients.append(threading.Thread(target=send))
            clients[-1].start()
            arrived.wait(0.3)
        assert arrived.is_set()
        started = time.monotonic()
        health.health_status = 503  # the checks find it dead
        for client in clients:
            client.join(15)
        assert len(answers) == len(clients), "a request was still waiting for the dead backend"
        assert [answer.status_code for answer in answers] == [200] * len(clients)
        assert {port_of(answer) for answer in answers} == {b.port}
        assert time.monotonic() - started < 5
        text = httpx.get(gw.url + "/metrics").text
        assert f'switchyard_upstream_errors_total{{backend="{a.url}",kind="disconnect"}} 1.0' in text
        released.set()
