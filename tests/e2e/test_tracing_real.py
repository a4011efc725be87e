"""One trace from the client through the gateway into real vLLM: the chat worker runs with
`--otlp-traces-endpoint`, the gateway with tracing on, and both export to the stack's OTLP receiver."""

from __future__ import annotations

import secrets

import pytest

from tests.e2e.conftest import E2EStack
from tests.otlp_receiver import ReceivedSpan

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3  # OTLP SpanKind values


def test_vllms_span_is_a_child_of_the_gateways_attempt(e2e: E2EStack) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    client = e2e.client(timeout=60)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=4,
        stream=True,
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text

    def ours(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [span for span in spans if span.trace_id == trace_id]

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {(span.service, span.kind) for span in ours(spans)}
        return {("switchyard-gateway", SERVER), ("switchyard-gateway", CLIENT), ("vllm-chat", SERVER)} <= names

    spans = ours(e2e.traces.wait_for(complete, timeout=30))
    server = next(s for s in spans if s.service == "switchyard-gateway" and s.kind == SERVER)
    attempt = next(s for s in spans if s.service == "switchyard-gateway" and s.kind == CLIENT)
    engine = next(s for s in spans if s.service == "vllm-chat")
    assert server.parent_span_id == parent  # the client's context, continued
    assert attempt.parent_span_id == server.span_id
    assert attempt.attributes["server.address"] == e2e.chat_worker
    assert engine.name == "llm_request"
    assert engine.parent_span_id == attempt.span_id  # vLLM took the context the attempt sent
    assert engine.attributes["gen_ai.usage.completion_tokens"] == server.attributes["gen_ai.usage.output_tokens"]
