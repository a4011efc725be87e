"""Mid-stream failover through the gateway, over real sockets, against simulators with fault flags.

The simulators run with `--positional-output`: answer token i is the number i (four characters), counted from
the answer tokens the prompt already ends with. A continuation that started a token early or late would show a
number twice or skip one, so the text `   0   1   2 ...` proves the stream went on from the right token.

A fault after k tokens hits every simulator of the fleet (and only a request with more tokens to come), so a
stream of 2k tokens is continued once, for its last k tokens, wherever it was routed first.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.resilience.support import assert_one_stream, is_error_event, metric_sum, positional, sse_payloads
from tests.servers import GatewayServer, SimProcess, gateway, running_sims, sim, wait_until

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FAULTS = {
    "drop": "--drop-after-tokens",  # the connection closes mid-body
    "exit": "--exit-after-tokens",  # the process exits at once, as with kill -9
    "stall": "--stall-after-tokens",  # nothing more, the connection open: the idle timeout fires
    "error": "--error-after-tokens",  # vLLM's mid-stream error event, then [DONE]
}
IDLE = 0.3  # the gateway's idle timeout in these tests (the stall fault)
NO_EJECTION = {"eject_after": 1000}  # every simulator fails on purpose: passive ejection would leave none


def fault_sims(fault: str, k: int, count: int = 2) -> list[SimProcess]:
    return [sim("m", FAULTS[fault], str(k), "--positional-output") for _ in range(count)]


def fault_gateway(sims: list[SimProcess], **config: Any) -> GatewayServer:
    config.setdefault("health", NO_EJECTION)
    return gateway(*(s.url for s in sims), timeouts={"idle": IDLE}, **config)


def body(route: str, tokens: int, usage: bool, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": tokens, "ignore_eos": True, **extra}
    if route == CHAT:
        payload["messages"] = [{"role": "user", "content": "Count, please."}]
    else:
        payload["prompt"] = "Count, please."
    if usage:
        payload["stream_options"] = {"include_usage": True}
    return payload


def prompt_tokens(url: str, route: str) -> int:
    """The prompt's token count, from the simulator's /tokenize (the same tokenizer as its engine)."""
    request = body(route, 1, False)
    fields = {key: request[key] for key in ("model", "messages", "prompt") if key in request}
    count: int = httpx.post(url + "/tokenize", json=fields, timeout=10).json()["count"]
    return count


def stream_text(gw: GatewayServer, payload: dict[str, Any], route: str, headers: dict[str, str] | None = None) -> str:
    with httpx.stream("POST", gw.url + route, json=payload, headers=headers, timeout=20) as response:
        assert response.status_code == 200
        return response.read().decode()


def failovers(gw: GatewayServer, outcome: str) -> float:
    return metric_sum(httpx.get(gw.url + "/metrics").text, "switchyard_stream_failovers_total", outcome=outcome)


VARIANTS = [(route, usage) for route in (CHAT, COMPLETIONS) for usage in (False, True)]


@pytest.mark.parametrize("fault", ["drop", "stall", "error"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_stream_goes_on_from_another_backend(fault: str, k: int) -> None:
    sims = fault_sims(fault, k)
    tokens = 2 * k
    with running_sims(*sims), fault_gateway(sims) as gw:
        prompts = {route: prompt_tokens(sims[0].url, route) for route in (CHAT, COMPLETIONS)}
        for route, usage in VARIANTS:
            raw = stream_text(gw, body(route, tokens, usage), route)
            assert_one_stream(raw, route, tokens, prompts[route], usage)
        assert failovers(gw, "continued") == len(VARIANTS)
        assert failovers(gw, "failed") + failovers(gw, "no_backend") + failovers(gw, "exhausted") == 0


@pytest.mark.parametrize(
    ("k", "route", "usage"), [(1, CHAT, True), (1, COMPLETIONS, False), (4, CHAT, False), (4, COMPLETIONS, True)]
)
def test_stream_goes_on_after_its_backend_process_exits(k: int, route: str, usage: bool) -> None:
    sims = fault_sims("exit", k)
    tokens = 2 * k
    with running_sims(*sims), fault_gateway(sims) as gw:
        prompt = prompt_tokens(sims[0].url, route)
        raw = stream_text(gw, body(route, tokens, usage), route)
        assert sum(s.process is not None and s.process.poll() is not None for s in sims) == 1
        assert_one_stream(raw, route, tokens, prompt, usage)
        assert failovers(gw, "continued") == 1


@pytest.fixture(scope="module")
def dropping() -> Iterator[tuple[list[SimProcess], GatewayServer]]:
    sims = fault_sims("drop", 3)
    with running_sims(*sims), fault_gateway(sims) as gw:
        yield sims, gw


def sdk(gw: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_openai_sdk_sees_one_stream(fault: str) -> None:
    sims = fault_sims(fault, 4, count=3)  # three: the exit fault takes one simulator per stream
    with running_sims(*sims), fault_gateway(sims) as gw:
        client = sdk(gw)
        chat = list(
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "Count, please."}],
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert len({(c.id, c.created, c.model) for c in chat}) == 1
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == positional(7)
        assert [c.choices[0].delta.role for c in chat if c.choices and c.choices[0].delta.role] == ["assistant"]
        assert [c.choices[0].finish_reason for c in chat if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chat[-1].usage is not None
        assert chat[-1].usage.completion_tokens == 7
        text = list(
            client.completions.create(
                model="m", prompt="Count, please.", max_tokens=7, stream=True, extra_body={"ignore_eos": True}
            )
        )
        assert len({(c.id, c.created, c.model) for c in text}) == 1
        assert "".join(c.choices[0].text for c in text) == positional(7)
        assert [c.choices[0].finish_reason for c in text if c.choices[0].finish_reason] == ["length"]
        assert all(c.usage is None for c in text)
        assert failovers(gw, "continued") == 2


def test_client_asking_for_token_ids_gets_them_across_the_failover(
    dropping: tuple[list[SimProcess], GatewayServer],
) -> None:
    _, gw = dropping
    raw = stream_text(gw, body(COMPLETIONS, 5, True, return_token_ids=True), COMPLETIONS)
    chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
    ids = [i for c in chunks for choice in c["choices"] for i in choice["token_ids"]]
    assert ids == [128 + i for i in range(5)]  # the simulator's position tokens
    prompt_ids = [choice["prompt_token_ids"] for c in chunks for choice in c["choices"]]
    assert prompt_ids[0]
    assert prompt_ids[1:] == [None] * 4


def test_accounting_counts_the_stream_once(
    dropping: tuple[list[SimProcess], GatewayServer], caplog: pytest.LogCaptureFixture
) -> None:
    sims, gw = dropping
    text = httpx.get(gw.url + "/metrics").text
    before = {kind: metric_sum(text, "switchyard_tokens_total", kind=kind) for kind in ("prompt", "completion")}
    disconnects = metric_sum(text, "switchyard_upstream_errors_total", kind="disconnect")
    dropped = {
        s.url: metric_sum(text, "switchyard_upstream_errors_total", kind="disconnect", backend=s.url) for s in sims
    }
    prompt = prompt_tokens(sims[0].url, CHAT)
    with caplog.at_level(logging.INFO, logger="switchyard.access"):
        stream_text(gw, body(CHAT, 5, False), CHAT, headers={"x-request-id": "counted-once"})
        wait_until(lambda: "counted-once" in caplog.text, 5, what="the access log line")
    lines = [json.loads(r.getMessage()) for r in caplog.records if "counted-once" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0]["failovers"] == 1
    assert lines[0]["status"] == 200
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (prompt, 5)
    text = httpx.get(gw.url + "/metrics").text
    assert metric_sum(text, "switchyard_tokens_total", kind="prompt") - before["prompt"] == prompt
    assert metric_sum(text, "switchyard_tokens_total", kind="completion") - before["completion"] == 5
    assert metric_sum(text, "switchyard_upstream_errors_total", kind="disconnect") - disconnects == 1
    assert metric_sum(text, "switchyard_requests_total", code="200") >= 1
    (failed,) = [
        url
        for url, n in dropped.items()
        if metric_sum(text, "switchyard_upstream_errors_total", kind="disconnect", backend=url) > n
    ]
    assert lines[0]["backend"] in dropped
    assert lines[0]["backend"] != failed  # the log names the backend that finished the answer


def test_failed_backend_gets_outlier_treatment() -> None:
    good, bad = sim("m", "--positional-output"), sim("m", "--drop-after-tokens", "2", "--positional-output")
    with running_sims(good, bad), gateway(good.url, bad.url, health={"eject_after": 2, "eject_base": 30}) as gw:
        for n in range(20):  # different prompts: some routed to the dropping backend first
            payload = {**body(COMPLETIONS, 4, False), "prompt": f"Count {n}."}
            raw = stream_text(gw, payload, COMPLETIONS)
            assert "".join(json.loads(p)["choices"][0]["text"] for p in sse_payloads(raw)[:-1]) == positional(4)
        (backend,) = [b for b in gw.registry.backends if b.url == bad.url]
        assert backend.ejected_until > 0, "two streams broken in a row: ejected"
        assert failovers(gw, "continued") >= 2


@pytest.mark.parametrize(
    ("extra", "headers", "config"),
    [
        ({}, {"X-Switchyard-Failover": "off"}, {}),
        ({}, {}, {"failover": {"enabled": False}}),
        ({"presence_penalty": 0.5}, {}, {}),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {}, {}),
        ({"logprobs": True}, {}, {}),
        ({}, {}, {"retries": {"budget_reserve": 0, "budget_ratio": 0}}),
        ({}, {}, {"failover": {"max_attempts": 0}}),
    ],
    ids=["opt-out", "disabled", "penalty", "tools", "logprobs", "no-budget", "no-attempts"],
)
def test_streams_not_continued_end_with_an_error_event(
    extra: dict[str, Any], headers: dict[str, str], config: dict[str, Any]
) -> None:
    sims = fault_sims("drop", 2)
    with running_sims(*sims), fault_gateway(sims, **config) as gw:
        raw = stream_text(gw, body(CHAT, 6, False, **extra), CHAT, headers)
        payloads = sse_payloads(raw)
        assert payloads[-1] == "[DONE]"
        assert is_error_event(payloads[-2])
        assert "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-2]) == (
            positional(2)
        )
        assert failovers(gw, "continued") == 0


def test_no_other_backend() -> None:
    (lone,) = fault_sims("drop", 2, count=1)
    with running_sims(lone), fault_gateway([lone]) as gw:
        payloads = sse_payloads(stream_text(gw, body(CHAT, 6, False), CHAT))
        assert payloads[-1] == "[DONE]"
        assert is_error_event(payloads[-2])
        assert failovers(gw, "no_backend") == 1


def test_error_event_before_content_is_passed_on() -> None:
    sims = fault_sims("error", 0)  # the request's own error: it would fail on any backend
    with running_sims(*sims), fault_gateway(sims) as gw:
        payloads = sse_payloads(stream_text(gw, body(CHAT, 6, False), CHAT))
        assert payloads[-1] == "[DONE]"
        assert is_error_event(payloads[-2])
        assert "Internal server error" in payloads[-2]
        assert failovers(gw, "continued") == 0


def test_continuation_that_fails_again_within_max_attempts() -> None:
    sims = fault_sims("drop", 3, count=3)
    with running_sims(*sims), fault_gateway(sims, failover={"max_attempts": 2}) as gw:
        raw = stream_text(gw, body(CHAT, 8, True), CHAT)  # 3 + 3 + 2 tokens: two continuations
        assert_one_stream(raw, CHAT, 8, prompt_tokens(sims[0].url, CHAT), True)
        assert failovers(gw, "continued") == 2
    sims = fault_sims("drop", 3, count=3)
    with running_sims(*sims), fault_gateway(sims) as gw:  # max_attempts 1: the second failure ends it
        payloads = sse_payloads(stream_text(gw, body(CHAT, 8, True), CHAT))
        assert payloads[-1] == "[DONE]"
        assert is_error_event(payloads[-2])
        text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-2])
        assert text == positional(6)
        assert (failovers(gw, "continued"), failovers(gw, "exhausted")) == (1, 1)


def test_non_stream_request_retried_when_its_backend_dies_mid_generation() -> None:
    slow = [sim("m", "--decode-ms-per-token", "20", "--positional-output", fast=False) for _ in range(2)]
    with running_sims(*slow), gateway(*(s.url for s in slow)) as gw, httpx.Client(timeout=20) as client:
        answers: list[httpx.Response] = []
        payload = {"model": "m", "prompt": "Count, please.", "max_tokens": 50, "ignore_eos": True}
        thread = threading.Thread(target=lambda: answers.append(client.post(gw.url + COMPLETIONS, json=payload)))
        thread.start()
        wait_until(lambda: any(s.metric("vllm:num_requests_running") == 1 for s in slow), 5, what="generation")
        (victim,) = [s for s in slow if s.metric("vllm:num_requests_running") == 1]
        time.sleep(0.2)  # mid-generation: about ten tokens in
        victim.kill()
        thread.join(20)
        assert answers, "no answer"
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["choices"][0]["text"] == positional(50)
        assert metric_sum(httpx.get(gw.url + "/metrics").text, "switchyard_retries_total") == 1
