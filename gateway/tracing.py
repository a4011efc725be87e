"""OpenTelemetry traces of the gateway's requests (`tracing: {enabled: true}`; off by default, and free when off).

Per request: one server span, a child for admission and routing, and a child per upstream attempt. A W3C
`traceparent` from the client is continued, and each attempt injects its own context into the request it sends,
so a vLLM started with `--otlp-traces-endpoint` puts its span under the gateway's attempt.

The exporter follows the standard environment: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL (http/protobuf, the default, or grpc when its exporter is installed),
OTEL_SERVICE_NAME (default switchyard-gateway), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and OTEL_BSP_*.
Spans are exported in batches by the SDK's BatchSpanProcessor, on its own thread: a slow or unreachable
collector costs dropped spans (its queue is bounded), never a slower or failed request. The provider belongs
to the app (the OpenTelemetry global is left alone), and the lifespan shuts it down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.errors import ConfigError
from gateway.proxy.vllm_bool import is_true

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange

log = logging.getLogger("switchyard.tracing")

# Attribute names: OpenTelemetry's semantic conventions where they exist (HTTP, server, gen_ai), else ours.
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS = "http.response.status_code"
URL_PATH = "url.path"
URL_FULL = "url.full"
SERVER_ADDRESS = "server.address"
ERROR_TYPE = "error.type"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_MODEL = "gen_ai.request.model"
GEN_AI_STREAM = "gen_ai.request.stream"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CACHED_TOKENS = "gen_ai.usage.cache_read_input_tokens"  # reported by the engine
GEN_AI_TTFT = "gen_ai.response.time_to_first_chunk"  # seconds
BACKEND = "switchyard.backend"
POLICY = "switchyard.policy"
PREDICTED_CACHED = "switchyard.cached_tokens.predicted"
RETRIES = "switchyard.retries"
FAILOVERS = "switchyard.failovers"
ATTEMPT = "switchyard.attempt"
QUEUED = "switchyard.admission.queued"  # the request waited for an admission slot
# The W3C context headers: a client's are continued by the server span, and each attempt sends its own.
TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}

DEFAULT_SERVICE = "switchyard-gateway"
SHUTDOWN_S = 5.0


def _exporter() -> SpanExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc")


class Tracing:
    """The app's tracer (None when tracing is off: every hook then costs one attribute check)."""

    def __init__(self, enabled: bool, exporter: SpanExporter | None = None) -> None:
        self._provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        self._propagator = TraceContextTextMapPropagator()
        if not enabled:
            return
        resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        if not named:  # else the SDK's unknown_service:<executable>
            resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE}))
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter or _exporter()))
        self.tracer = self._provider.get_tracer("switchyard.gateway")

    def server_span(self, route: str, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Span:
        """The request's span, continuing the client's trace when it sent a W3C context."""
        assert self.tracer is not None
        carrier: dict[str, str] = {}
        for name, value in headers:
            if name in TRACE_HEADERS:
                carrier[name.decode()] = value.decode("latin-1")
        context = self._propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            f"{method} {route}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={HTTP_METHOD: method, HTTP_ROUTE: route, URL_PATH: path},
        )

    def child(self, parent: Span, name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None) -> Span:
        assert self.tracer is not None
        return self.tracer.start_span(
            name, context=trace.set_span_in_context(parent), kind=kind, attributes=dict(attributes or {})
        )

    def context_headers(self, span: Span) -> list[tuple[bytes, bytes]]:
        """`traceparent` (and `tracestate`) naming `span` as the parent of what the backend does."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]

    async def shutdown(self) -> None:
        """Export what is queued (for at most SHUTDOWN_S), off the event loop."""
        provider = self._provider
        if provider is None:
            return
        try:
            async with asyncio.timeout(SHUTDOWN_S):
                await asyncio.to_thread(provider.shutdown)
        except TimeoutError:
            log.warning("tracing: spans still queued after %.0f s at shutdown were dropped", SHUTDOWN_S)


def fail(span: Span, error_type: str, message: str) -> None:
    span.set_attribute(ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, message))


def end_server_span(span: Span, exchange: Exchange) -> None:
    """The request's span gets what happened to it, then ends."""
    outcome = exchange.outcome
    info = outcome.info
    attributes: dict[str, Any] = {
        HTTP_STATUS: outcome.status,
        GEN_AI_MODEL: exchange.label,
        RETRIES: outcome.retries,
        FAILOVERS: outcome.failovers,
    }
    operation = OPERATIONS.get(exchange.route)
    if operation is not None:
        attributes[GEN_AI_OPERATION] = operation
    if info.payload is not None:
        attributes[GEN_AI_STREAM] = is_true(info.payload.get("stream"))
    if outcome.backend is not None:
        attributes[BACKEND] = outcome.backend
    if outcome.ttft is not None:
        attributes[GEN_AI_TTFT] = outcome.ttft
    usage = outcome.settle_usage()
    if usage is not None:
        attributes[GEN_AI_INPUT_TOKENS] = usage.prompt_tokens
        attributes[GEN_AI_OUTPUT_TOKENS] = usage.completion_tokens
        if usage.cached_tokens is not None:
            attributes[GEN_AI_CACHED_TOKENS] = usage.cached_tokens
    if outcome.predicted_cached is not None:
        attributes[PREDICTED_CACHED] = outcome.predicted_cached
    span.set_attributes(attributes)
    if outcome.status >= 500:
        fail(span, str(outcome.status), f"answered {outcome.status}")
    span.end()
