"""Traces over real sockets: the gateway under uvicorn exports OTLP/HTTP protobuf to a real receiver, and the
echo upstream shows the `traceparent` each attempt sends."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.echo_upstream import Behaviour, echo_app, forwarded_headers
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, grpc_otlp_receiver, otlp_receiver
from tests.servers import GatewayServer, ThreadedServer, free_port, gateway, running_sims, sim, wait_until

SERVER, CLIENT, INTERNAL = 2, 3, 1  # SpanKind values in OTLP
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    server, spans = otlp_receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    with server:
        yield spans


@pytest.fixture(scope="module")
def echo() -> Iterator[ThreadedServer]:
    with ThreadedServer(echo_app(["chat"])) as upstream:
        yield upstream


def traced_gateway(*backends: str) -> GatewayServer:
    return gateway(*backends, tracing={"enabled": True})


def ready(gw: GatewayServer, model: str) -> None:
    wait_until(lambda: httpx.get(gw.url + "/v1/models").json()["data"] != [], 10, what=f"{model} listed")


def trace_of(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.trace_id == trace_id]


def attempts_of(spans: list[ReceivedSpan], server: ReceivedSpan) -> list[ReceivedSpan]:
    """The client spans of the server span's trace, in attempt order."""
    attempts = [span for span in trace_of(spans, server.trace_id) if span.kind == CLIENT]
    return sorted(attempts, key=lambda span: span.attributes["switchyard.attempt"])


def test_server_span_continues_the_clients_trace(receiver: OtlpReceiver, echo: ThreadedServer) -> None:
    with traced_gateway(echo.url) as gw:
        ready(gw, "chat")
        answer = httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "chat"}, headers={"traceparent": TRACEPARENT}
        )
        assert answer.status_code == 200
        spans = receiver.wait_for(lambda got: len(trace_of(got, CLIENT_TRACE)) >= 3)
    ours = trace_of(spans, CLIENT_TRACE)
    server = next(span for span in ours if span.kind == SERVER)
    assert server.parent_span_id == CLIENT_PARENT
    assert server.service == "switchyard-gateway"
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["switchyard.backend"] == echo.url
    routing = next(span for span in ours if span.kind == INTERNAL)
    attempt = next(span for span in ours if span.kind == CLIENT)
    assert routing.parent_span_id == server.span_id
    assert routing.attributes["switchyard.backend"] == echo.url
    assert attempt.parent_span_id == server.span_id
    assert attempt.attributes["server.address"] == echo.url
    assert attempt.attributes["switchyard.attempt"] == 1
    # The upstream was told the attempt is its parent, in the client's trace (not the client's span).
    seen = forwarded_headers(answer)
    assert seen["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.span_id}-01"


def test_each_attempt_is_a_span_and_a_failed_one_says_why(receiver: OtlpReceiver, echo: ThreadedServer) -> None:
    config = {"tracing": {"enabled": True}, "routing": {"policy": "round_robin"}}
    with (
        ThreadedServer(echo_app(["chat"], Behaviour(answer_status=503))) as busy,
        gateway(busy.url, echo.url, **config) as gw,
    ):
        wait_until(lambda: len(gw.registry.candidates("chat")) == 2, 10, what="both upstreams serve chat")
        for _ in range(4):  # round robin: some of them try the busy upstream first, then the other
            answer = httpx.post(gw.url + "/v1/chat/completions", json={"model": "chat"})
            assert answer.status_code == 200
        spans = receiver.wait_for(lambda got: sum(s.kind == SERVER for s in got) >= 4)
    servers = [s for s in spans if s.kind == SERVER]
    assert any(s.attributes["switchyard.retries"] == 1 for s in servers)
    for server in servers:
        attempts = attempts_of(spans, server)
        assert all(s.parent_span_id == server.span_id for s in attempts)
        if server.attributes["switchyard.retries"] == 0:
            assert [s.attributes["server.address"] for s in attempts] == [echo.url]
            continue
        assert [s.attributes["server.address"] for s in attempts] == [busy.url, echo.url]
        assert attempts[0].attributes["http.response.status_code"] == 503
        assert attempts[0].status_code == 2
        assert attempts[0].attributes["error.type"] == "503"
        assert attempts[1].attributes["http.response.status_code"] == 200
        assert attempts[1].status_code != 2


def test_a_stream_that_fails_over_has_an_attempt_span_per_backend(receiver: OtlpReceiver) -> None:
    broken = sim("m", "--drop-after-tokens", "3", "--positional-output")
    healthy = sim("m", "--positional-output")
    config = {"tracing": {"enabled": True}, "routing": {"policy": "round_robin"}}
    with running_sims(broken, healthy), gateway(broken.url, healthy.url, **config) as gw:
        wait_until(lambda: len(gw.registry.candidates("m")) == 2, 10, what="both simulators serve m")
        for _ in range(4):  # round robin: some of them start on the backend that drops them
            with httpx.stream(
                "POST",
                gw.url + "/v1/completions",
                json={"model": "m", "prompt": "one two three", "max_tokens": 6, "stream": True},
                timeout=20,
            ) as response:
                assert response.status_code == 200
                assert response.read().endswith(b"data: [DONE]\n\n")
        spans = receiver.wait_for(lambda got: sum(s.kind == SERVER for s in got) >= 4)
    servers = [s for s in spans if s.kind == SERVER]
    assert any(s.attributes["switchyard.failovers"] == 1 for s in servers)
    for server in servers:
        attempts = attempts_of(spans, server)
        if server.attributes["switchyard.failovers"] == 0:
            assert [s.attributes["server.address"] for s in attempts] == [healthy.url]
            continue
        assert [s.attributes["server.address"] for s in attempts] == [broken.url, healthy.url]
        assert attempts[0].status_code == 2
        assert attempts[0].attributes["error.type"] == "disconnect"
        assert all(s.parent_span_id == server.span_id for s in attempts)


def test_tracing_off_passes_the_clients_traceparent_unchanged(echo: ThreadedServer) -> None:
    with gateway(echo.url) as gw:
        ready(gw, "chat")
        answer = httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "chat"}, headers={"traceparent": TRACEPARENT}
        )
    assert forwarded_headers(answer)["traceparent"] == TRACEPARENT


def test_spans_reach_a_collector_over_grpc(monkeypatch: pytest.MonkeyPatch, echo: ThreadedServer) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc (a collector's port 4317, vLLM's default protocol) works as installed."""
    with grpc_otlp_receiver() as (endpoint, receiver):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        with traced_gateway(echo.url) as gw:
            ready(gw, "chat")
            answer = httpx.post(
                gw.url + "/v1/chat/completions", json={"model": "chat"}, headers={"traceparent": TRACEPARENT}
            )
            assert answer.status_code == 200
            spans = receiver.wait_for(lambda spans: any(s.kind == SERVER for s in trace_of(spans, CLIENT_TRACE)))
    (server,) = [span for span in trace_of(spans, CLIENT_TRACE) if span.kind == SERVER]
    assert server.parent_span_id == CLIENT_PARENT
    assert server.service == "switchyard-gateway"
    assert [span.kind for span in attempts_of(spans, server)] == [CLIENT]


def test_an_unreachable_collector_fails_and_slows_nothing(
    monkeypatch: pytest.MonkeyPatch, echo: ThreadedServer
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    with traced_gateway(echo.url) as gw:
        ready(gw, "chat")
        with httpx.Client(base_url=gw.url) as client:
            started = time.monotonic()
            codes = [client.post("/v1/chat/completions", json={"model": "chat"}).status_code for _ in range(50)]
            elapsed = time.monotonic() - started
    assert codes == [200] * 50
    # The exporter retries with back-off for seconds on its own thread; requests never wait for it.
    assert elapsed < 5.0, f"50 requests took {elapsed:.1f} s with the collector down"
