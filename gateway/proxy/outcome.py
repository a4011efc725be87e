"""What happened to one request, and where that ends up: metrics, the access log, the key's token budget, and
what routing learns from the engine's count of prompt tokens.

All of that is bookkeeping after the answer, so `python -m gateway` does it in batches (`batch=True`): a
request appends its outcome to a list, and every FLUSH_S (or at FLUSH_ENTRIES outcomes, at a /metrics scrape
and at shutdown) the list is worked through in one loop, usage parsed from the answer's tail there too. In situ
the same work cost twice as much spread over the requests, where its code had left the CPU's caches. Metrics
are as exact at every scrape, a token charge lands at most FLUSH_S later (a charge waits for the whole answer
anyway), and the access log's lines were batched already. An app embedded in another server accounts for each
request at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, time

from gateway.metrics import NO_MODEL, Metrics
from gateway.proxy.access_log import AccessLog
from gateway.proxy.usage import Usage, parse_usage
from gateway.routing.request import RequestInfo
from gateway.tenancy.auth import Principal

NO_INFO = RequestInfo(model=NO_MODEL, route="")  # until the request has been read
FLUSH_S = 0.05
FLUSH_ENTRIES = 512


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
    delivered: bool = False  # the client hung up only after the whole answer (an event stream's [DONE])
    usage: Usage | None = None
    usage_tail: bytes | None = None  # the answer's last bytes, where its usage is, until parsed (`settle_usage`)
    predicted_cached: int | None = None  # prompt tokens routing expected the backend to have cached
    # A stream its client left before its usage came: the tokens its key is charged (the prompt as routing
    # estimated it, and the content events it received), so that hanging up early does not escape a limit.
    unreported_tokens: int = 0
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # e.g. x-ratelimit-*

    def settle_usage(self) -> Usage | None:
        """The answer's token usage, parsed from its tail the first time it is asked for."""
        tail = self.usage_tail
        if tail is not None:
            self.usage_tail = None
            self.usage = parse_usage(tail)
        return self.usage


Learn = Callable[[RequestInfo, int], None]  # routing learns from the engine's count of a prompt's tokens
_Pending = tuple[str, str, Outcome, float, Principal | None]


class Recorder:
    """Turns finished requests' Outcomes into metrics, access-log entries, token charges and routing's learning."""

    def __init__(self, metrics: Metrics, access_log: AccessLog | None, batch: bool = False) -> None:
        self._metrics = metrics
        self._log = access_log
        self._batch = batch
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self.learn: Learn | None = None  # set by the app once its router exists

    def record(self, model: str, route: str, outcome: Outcome, seconds: float, principal: Principal | None) -> None:
        if not self._batch:
            self._account(model, route, outcome, seconds, principal, time())
            return
        pending = self._pending
        pending.append((model, route, outcome, seconds, principal))
        if len(pending) >= FLUSH_ENTRIES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        """Account for every outcome recorded so far."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = self._pending
        self._pending = []
        account = self._account
        clock = time() - perf_counter()  # wall time of the perf_counter() origin: when each request ended
        for model, route, outcome, seconds, principal in pending:
            account(model, route, outcome, seconds, principal, outcome.started + seconds + clock)

    def _account(
        self, model: str, route: str, outcome: Outcome, seconds: float, principal: Principal | None, ended: float = 0.0
    ) -> None:
        metrics = self._metrics
        metrics.observe(model, route, outcome.status, seconds)
        usage = outcome.settle_usage()
        if outcome.ttft is not None or usage is not None or outcome.retries:
            series = metrics.model_series(model)
            if outcome.ttft is not None:
                series.ttft.observe(outcome.ttft)
            if usage is not None:
                series.prompt_tokens.inc(usage.prompt_tokens)
                series.completion_tokens.inc(usage.completion_tokens)
            if outcome.retries:
                series.retries.inc(outcome.retries)
        if usage is None:
            if principal is not None and outcome.unreported_tokens:
                principal.charge_tokens(outcome.unreported_tokens)
        else:
            if principal is not None:
                principal.charge_tokens(usage.prompt_tokens + usage.completion_tokens)
            if self.learn is not None and outcome.backend is not None:
                self.learn(outcome.info, usage.prompt_tokens)
        predicted = outcome.predicted_cached
        reported = usage.cached_tokens if usage is not None else None
        if (predicted is not None or reported is not None) and outcome.backend is not None:
            metrics.record_cached_tokens(model, outcome.backend, predicted, reported)
        log = self._log
        if log is not None:
            log.write(
                (
                    ended,
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
