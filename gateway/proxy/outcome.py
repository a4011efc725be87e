"""What happened to one request, and where that ends up: metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass, field
from time import time

from gateway.metrics import NO_MODEL, Metrics
from gateway.proxy.access_log import AccessLog
from gateway.proxy.usage import Usage
from gateway.routing.request import RequestInfo

NO_INFO = RequestInfo(model=NO_MODEL, route="")  # until the request has been read


@dataclass(slots=True)
class Outcome:
    """What happened to one request: filled in along the way, logged and measured at the end."""

    request_id: bytes
    started: float
    info: RequestInfo = NO_INFO
    status: int = 0
    backend: str | None = None
    retries: int = 0
    failovers: int = 0  # continuations of a stream on other backends after its backend failed mid-stream
    ttft: float | None = None
    usage: Usage | None = None
    predicted_cached: int | None = None  # prompt tokens routing expected the backend to have cached
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # e.g. x-ratelimit-*


class Recorder:
    """Turns a finished request's Outcome into metrics and one access-log entry (a JSON line)."""

    def __init__(self, metrics: Metrics, access_log: AccessLog | None) -> None:
        self._metrics = metrics
        self._log = access_log

    def record(self, model: str, route: str, outcome: Outcome, seconds: float) -> None:
        metrics = self._metrics
        metrics.observe(model, route, outcome.status, seconds)
        if outcome.ttft is not None or outcome.usage is not None or outcome.retries:
            series = metrics.model_series(model)
            if outcome.ttft is not None:
                series.ttft.observe(outcome.ttft)
            if outcome.usage is not None:
                series.prompt_tokens.inc(outcome.usage.prompt_tokens)
                series.completion_tokens.inc(outcome.usage.completion_tokens)
            if outcome.retries:
                series.retries.inc(outcome.retries)
        predicted = outcome.predicted_cached
        reported = outcome.usage.cached_tokens if outcome.usage is not None else None
        if (predicted is not None or reported is not None) and outcome.backend is not None:
            metrics.record_cached_tokens(model, outcome.backend, predicted, reported)
        log = self._log
        if log is not None:
            usage = outcome.usage
            log.write(
                (
                    time(),
                    outcome.request_id,
                    route,
                    model,
                    outcome.backend,
                    outcome.status,
                    seconds,
                    outcome.ttft,
                    usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None,
                    outcome.retries,
                    outcome.failovers,
                    predicted,
                    reported,
                )
            )
