"""Gateway metrics and the access log measured against simulators: tokens from vLLM's usage (also for
streams whose client did not ask for it), TTFT and inter-token histograms, bounded labels."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.fleet.registry import BackendSpec, Registry
from gateway.metrics import DEPARTED_S, Metrics
from tests.gateway.echo_upstream import Behaviour, echo_app
from tests.servers import GatewayServer, SimProcess, ThreadedServer, gateway, running_sims, sim, wait_until

CHAT = [{"role": "user", "content": "Count the wagons in the yard."}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with running_sims(sim("m", "--decode-ms-per-token", "5")) as (server,):
        yield server


@pytest.fixture
def gw(upstream: SimProcess) -> Iterator[GatewayServer]:
    with gateway(upstream.url) as server:
        yield server


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def raw_stream(url: str, body: dict[str, object]) -> list[str]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        text = response.read().decode()
    return [event[len("data: ") :] for event in text.split("\n\n") if event.startswith("data: ")]


def test_stream_without_usage_is_counted_but_not_shown(gw: GatewayServer, upstream: SimProcess) -> None:
    body = {"model": "m", "messages": CHAT, "max_tokens": 9, "stream": True, "temperature": 0}
    via_gateway = raw_stream(gw.url, body)
    direct = raw_stream(upstream.url, body)
    assert via_gateway[-1] == "[DONE]"
    assert not any('"usage"' in event for event in via_gateway)  # the client sees what it asked for
    strip = [json.loads(e)["choices"] for e in via_gateway[:-1]]
    assert strip == [json.loads(e)["choices"] for e in direct[:-1]]  # and exactly the direct stream's content
    completion = sample(gw, "switchyard_tokens_total", model="m", kind="completion")
    assert completion == 9
    assert sample(gw, "switchyard_tokens_total", model="m", kind="prompt") > 0


def test_stream_with_usage_keeps_it_for_the_client(gw: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert sample(gw, "switchyard_tokens_total", model="m", kind="completion") == chunks[-1].usage.completion_tokens


def test_non_stream_usage_counted(gw: GatewayServer) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    result = client.completions.create(model="m", prompt="abc", max_tokens=4)
    assert result.usage is not None
    assert sample(gw, "switchyard_tokens_total", model="m", kind="prompt") == result.usage.prompt_tokens
    embedded = client.embeddings.create(model="m", input="wagons")
    expected = result.usage.prompt_tokens + embedded.usage.prompt_tokens
    assert sample(gw, "switchyard_tokens_total", model="m", kind="prompt") == expected


def lingering_upstream(model: str, words: list[str], linger_s: float) -> Starlette:
    """A vLLM-like server whose stream sends its usage and [DONE], then holds the body open a while before it
    ends it: the client has its whole answer before the gateway sees the upstream finish."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "root": model}]})

    def event(**fields: object) -> bytes:  # compact JSON, as vLLM writes it
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        return b"data: " + json.dumps({**head, **fields}, separators=(",", ":")).encode()

    async def chat(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for word in words:
                yield event(choices=[{"index": 0, "delta": {"content": word}, "finish_reason": None}]) + b"\n\n"
            usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
            yield event(choices=[], usage=usage)  # [DONE] comes in the next chunk, as framing may split them
            yield b"\n\ndata: [DONE]\n\n"
            await asyncio.sleep(linger_s)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def responses(request: Request) -> Response:
        """A Responses API stream as vLLM writes it: typed events, the last one with the usage, no [DONE]."""

        def typed(kind: str, **fields: object) -> bytes:
            data = json.dumps({**fields, "type": kind}, separators=(",", ":"))
            return f"event: {kind}\ndata: {data}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            yield typed("response.created", response={"id": "resp_1", "status": "in_progress", "usage": None})
            for word in words:
                yield typed("response.output_text.delta", delta=word, item_id="msg_1", output_index=0)
            yield typed("response.output_text.done", text="".join(words), item_id="msg_1", output_index=0)
            usage = {"input_tokens": 7, "output_tokens": len(words), "total_tokens": 7 + len(words)}
            yield typed("response.completed", response={"id": "resp_1", "status": "completed", "usage": usage})
            await asyncio.sleep(linger_s)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return Response()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
        ]
    )


@pytest.mark.parametrize("asgi_server", [False, True], ids=["own-server", "uvicorn"])
@pytest.mark.parametrize(
    ("include_usage", "failover"),
    [(False, "on"), (False, "off"), (True, "off")],
    ids=["failover-stream", "usage-hidden", "unfiltered"],
)
def test_a_client_that_hangs_up_after_done_had_its_whole_answer(
    asgi_server: bool, include_usage: bool, failover: str
) -> None:
    """The openai SDK closes the connection as soon as it reads [DONE]. That client got everything: the request
    counts as a 200 and its tokens are counted (and charged), not lost as a 499. Each way a stream can pass
    through (kept one stream for failover, its usage event hidden, untouched), under either server."""
    app = lingering_upstream("m", ["one ", "two ", "three"], linger_s=1.0)
    with ThreadedServer(app) as upstream, gateway(upstream.url, asgi_server=asgi_server) as gw:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=CHAT,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": include_usage},
                extra_headers={"X-Switchyard-Failover": failover},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
        assert (chunks[-1].usage is not None) is include_usage
        route = "/v1/chat/completions"
        wait_until(lambda: sample(gw, "switchyard_requests_total", model="m", route=route, code="200") == 1)
        assert sample(gw, "switchyard_requests_total", model="m", route=route, code="499") == 0
        assert sample(gw, "switchyard_tokens_total", model="m", kind="completion") == 3
        assert sample(gw, "switchyard_tokens_total", model="m", kind="prompt") == 7


@pytest.mark.parametrize("asgi_server", [False, True], ids=["own-server", "uvicorn"])
def test_a_responses_client_that_hangs_up_after_the_last_event_had_its_whole_answer(asgi_server: bool) -> None:
    """A Responses API stream has no [DONE]: its end is response.completed. A client that leaves after it got
    everything: a 200, its tokens counted (input and output, as the Responses API names them), one token per
    delta (the `.done` event repeats the text: no token)."""
    app = lingering_upstream("m", ["one ", "two ", "three"], linger_s=1.0)
    with ThreadedServer(app) as upstream, gateway(upstream.url, asgi_server=asgi_server) as gw:
        wait_until(lambda: httpx.get(gw.url + "/v1/models").json()["data"], 5, what="the model")
        body = {"model": "m", "input": "Count the wagons.", "stream": True}
        with httpx.stream("POST", gw.url + "/v1/responses", json=body, timeout=10) as response:
            assert response.status_code == 200
            kinds = []
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line[len("event: ") :])
                if kinds[-1:] == ["response.completed"] and line.startswith("data: "):
                    break  # the whole answer: hang up, the upstream still lingering
        assert kinds[-1] == "response.completed"
        route = "/v1/responses"
        wait_until(lambda: sample(gw, "switchyard_requests_total", model="m", route=route, code="200") == 1)
        assert sample(gw, "switchyard_requests_total", model="m", route=route, code="499") == 0
        assert sample(gw, "switchyard_tokens_total", model="m", kind="completion") == 3
        assert sample(gw, "switchyard_tokens_total", model="m", kind="prompt") == 7
        assert sample(gw, "switchyard_time_to_first_token_seconds_count", model="m") == 1
        assert sample(gw, "switchyard_inter_token_latency_seconds_count", model="m") == 2


def test_ttft_and_itl_histograms(gw: GatewayServer) -> None:
    raw_stream(gw.url, {"model": "m", "messages": CHAT, "max_tokens": 6, "stream": True})
    assert sample(gw, "switchyard_time_to_first_token_seconds_count", model="m") == 1
    # six content events: one time to first token, then five inter-token gaps
    assert sample(gw, "switchyard_inter_token_latency_seconds_count", model="m") == 5
    assert sample(gw, "switchyard_inter_token_latency_seconds_sum", model="m") > 0


def test_unknown_model_label_is_bounded(gw: GatewayServer) -> None:
    for i in range(5):
        httpx.post(gw.url + "/v1/completions", json={"model": f"attacker-{i}", "prompt": "x"})
    text = httpx.get(gw.url + "/metrics").text
    assert "attacker" not in text
    assert sample(gw, "switchyard_requests_total", model="__unknown__", route="/v1/completions", code="404") == 5


def test_backend_gauges_reexported(gw: GatewayServer, upstream: SimProcess) -> None:
    httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
    assert sample(gw, "switchyard_backend_up", backend=upstream.url) == 1
    assert sample(gw, "switchyard_backend_models", backend=upstream.url) == 1
    text = httpx.get(gw.url + "/metrics").text
    assert f'switchyard_backend_queue_depth{{backend="{upstream.url}"}}' in text
    assert f'switchyard_backend_kv_cache_usage{{backend="{upstream.url}"}}' in text


def test_access_log_line(gw: GatewayServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="switchyard.access"):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "m", "messages": CHAT, "max_tokens": 3, "stream": True},
            headers={"Authorization": "Bearer sk-very-secret", "X-Request-Id": "log-me"},
        )
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "switchyard.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "log-me"
    assert line["model"] == "m"
    assert line["status"] == 200
    assert line["completion_tokens"] == 3
    assert line["ttft_ms"] > 0
    assert line["retries"] == 0
    assert "sk-very-secret" not in caplog.text


def test_counters_with_known_label_values_start_at_zero(upstream: SimProcess) -> None:
    """Upstream errors per backend and kind, rejections and stream failovers per model and reason or outcome:
    exported at 0 before the first one, so that rate() over them is 0 and not "No data"; a backend that leaves
    takes its series along."""
    with running_sims(sim("other")) as (other,), gateway(upstream.url, other.url) as gw:

        def lines() -> set[str]:
            return set(httpx.get(gw.url + "/metrics").text.splitlines())

        wait_until(lambda: 'switchyard_rejected_requests_total{model="other",reason="shed"} 0.0' in lines(), 5)
        text = lines()
        for url in (upstream.url, other.url):
            for kind in ("connect", "timeout", "protocol", "status", "disconnect", "idle_timeout", "error_event"):
                assert f'switchyard_upstream_errors_total{{backend="{url}",kind="{kind}"}} 0.0' in text
        for model in ("m", "other"):
            for reason in ("rate_limit", "saturated", "queue_full", "queue_timeout", "shed"):
                assert f'switchyard_rejected_requests_total{{model="{model}",reason="{reason}"}} 0.0' in text
            for outcome in ("continued", "failed", "unsupported", "no_backend", "exhausted"):
                assert f'switchyard_stream_failovers_total{{model="{model}",outcome="{outcome}"}} 0.0' in text
        gw.registry.reconcile([spec for spec in _specs(gw) if spec.url != other.url])
        wait_until(lambda: not any(f'backend="{other.url}"' in line and "upstream_errors" in line for line in lines()),
                   5, what="the departed backend's series gone")  # fmt: skip


def _specs(gw: GatewayServer) -> list[BackendSpec]:
    return [BackendSpec(url=backend.url) for backend in gw.registry.backends]


def test_a_failed_answer_passed_on_is_an_upstream_error_too() -> None:
    """A 5xx the gateway does not retry (500 is not in retries.on_status) reaches the client as it is, and is
    counted as the backend's failure all the same: the upstream-errors panel and alert must see it."""
    broken = Behaviour(answer_status=500)
    with ThreadedServer(echo_app(["m"], broken)) as upstream, gateway(upstream.url) as gw:
        for _ in range(2):
            assert httpx.post(gw.url + "/v1/completions", json={"model": "m"}).status_code == 500
        text = httpx.get(gw.url + "/metrics").text
        assert f'switchyard_upstream_errors_total{{backend="{upstream.url}",kind="status"}} 2.0' in text
        broken.answer_status = 404  # a client error is the client's: no upstream error
        assert httpx.post(gw.url + "/v1/completions", json={"model": "m"}).status_code == 404
        text = httpx.get(gw.url + "/metrics").text
        assert f'switchyard_upstream_errors_total{{backend="{upstream.url}",kind="status"}} 2.0' in text


def test_every_series_of_a_departed_backend_goes_with_it() -> None:
    """A Kubernetes fleet changes addresses with every pod it replaces: a long-running gateway must not keep
    each departed pod's series for ever. A request still running there keeps its in-flight series until it
    ends; a count that lands after the departure is dropped at the next pass."""
    registry = Registry()
    metrics = Metrics(registry)
    stay, leave = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    registry.reconcile([BackendSpec(stay), BackendSpec(leave)])
    metrics.export_known_series(registry, now=0.0)
    for url in (stay, leave):
        metrics.kv_events.labels(url).inc(3)
        metrics.kv_event_lag.labels(url).set(0.01)
        metrics.kv_event_gaps.labels(url, "lost").inc()
        metrics.record_cached_tokens("m", url, 32, 16)
        metrics.inflight_gauge("m", url).inc()
    metrics.inflight_gauge("m", stay).dec()
    running = metrics.inflight_gauge("m", leave)  # a request still streaming from the departing backend

    def exported(url: str) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [line for line in text.splitlines() if f'backend="{url}"' in line]

    registry.reconcile([BackendSpec(stay)])
    metrics.export_known_series(registry, now=1.0)
    assert [line.split("{")[0] for line in exported(leave)] == ["switchyard_inflight_requests"]
    running.dec()
    metrics.upstream_errors.labels(leave, "disconnect").inc()  # the request's end, counted late
    metrics.export_known_series(registry, now=2.0)
    assert exported(leave) == []
    assert len(exported(stay)) > 10  # the other backend's series are all there
    metrics.export_known_series(registry, now=2.0 + DEPARTED_S + 1)  # forgotten: no work for it any more
    registry.reconcile([BackendSpec(stay), BackendSpec(leave)])  # back at the same address: exported again
    metrics.export_known_series(registry, now=DEPARTED_S + 10)
    assert f'switchyard_upstream_errors_total{{backend="{leave}",kind="connect"}} 0.0' in exported(leave)
