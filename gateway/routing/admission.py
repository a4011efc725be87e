"""Admission control: whether a request may go upstream now, wait at the gateway, or be turned away.

A request runs at once when the gateway-wide and per-model in-flight limits have room and the model's
pool is not saturated (mean over its backends of max(queue / queue_norm, kv / kv_norm), from fresh
scrapes). Otherwise it waits in a bounded queue: strict priority between bands (high, normal, low),
round robin between tenants inside a band, FIFO inside a tenant. Low priority sheds first: it is
refused outright while the pool is saturated, and once the queue is `low_priority_queue_share` full.
A full queue makes room for a higher-priority arrival by shedding the newest lowest-priority waiter.
Every refusal is a 429 with Retry-After and the reason in `X-Switchyard-Reject-Reason`; 503 stays
reserved for "no backend serves the model" (raised by the proxy before admission). A key's rate limits
are checked here too (`rate_limit`), so every 429 the gateway answers is counted in one place.

Everything runs on one event loop: a slot is taken in the same step as the decision (or handed
over to a waiter in the same step as the release), so limits are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NoReturn

from gateway.errors import GatewayError, NoHealthyBackend, Overloaded, RateLimited
from gateway.fleet.registry import Registry, fresh_sample
from gateway.metrics import Metrics
from gateway.routing.request import RequestInfo
from gateway.routing.settings import AdmissionSettings
from gateway.tenancy.auth import Principal


class Priority(enum.IntEnum):
    """The bands of the wait queue, most urgent first (the X-Switchyard-Priority header names them)."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


PRIORITY_NAMES = {priority.name.lower(): priority for priority in Priority}
RECHECK_S = 0.05  # how often waiters blocked only by saturation look at the scrapes again


@dataclass(eq=False, slots=True)
class _Waiter:
    model: str
    tenant: str
    band: Priority
    future: asyncio.Future[None]
    rejection: GatewayError | None = None


@dataclass(slots=True)
class _Band:
    """One priority's waiters: tenant -> FIFO, tenants in rotation order."""

    tenants: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    size: int = 0


class Admission:
    def __init__(self, settings: AdmissionSettings, registry: Registry, metrics: Metrics) -> None:
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._header = settings.priority_header.lower()
        self._global_limit = settings.max_inflight
        self._inflight = 0
        self._by_model: dict[str, int] = {}  # models with requests in flight (entries leave at zero)
        self._bands = tuple(_Band() for _ in Priority)
        self._waiting = 0
        self._queued: dict[str, int] = {}  # waiters per model (entries leave at zero)
        self._ticker: asyncio.Task[None] | None = None
        self._low_limit = int(settings.queue_size * settings.low_priority_queue_share)
        self._saturation: dict[str, tuple[int, float, float]] = {}  # model -> (engine version, when, value)

    # -- public ---------------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextlib.asynccontextmanager
    async def admit(self, request: RequestInfo) -> AsyncIterator[None]:
        """Hold an admission slot for the request's whole life upstream (released on any exit)."""
        if not self.try_enter(request):
            await self.enter(request)
        try:
            yield
        finally:
            self.leave(request.model)

    # The same in three calls, for the proxy's hot path: most requests take a slot at once, without the
    # cost of an async context manager.
    def try_enter(self, request: RequestInfo) -> bool:
        """Take a slot now when the request may run at once; False when it has to go through `enter`.

        It may when it has room and nobody waits for its model: the waiters of other models are held by their
        own model's limits or saturation (a slot any of them could take is handed over at once, on release),
        so it takes nothing from them, and a full queue of theirs does not turn it away."""
        model = request.model
        if (self._waiting == 0 or model not in self._queued) and self._has_room(model):
            self._take(model)
            return True
        return False

    async def enter(self, request: RequestInfo) -> None:
        """Wait in the queue for a slot; raises Overloaded when turned away. Pair with `leave`."""
        await self._wait(request.model, request.tenant, self._band_of(request))

    def leave(self, model: str) -> None:
        """Give back the slot taken by `try_enter` or `enter`."""
        self._release(model)

    def rate_limit(self, principal: Principal, model: str) -> list[tuple[bytes, bytes]]:
        """Take one request from the key's rate limits; returns its x-ratelimit-* headers, or raises RateLimited.

        Here rather than in the proxy so that every 429 is counted in one place (`_count`)."""
        try:
            return principal.admit()
        except RateLimited as exc:
            self._count(model, exc.reason)
            raise

    def _count(self, model: str, reason: str) -> None:
        self._metrics.rejected.labels(model, reason).inc()

    # -- decisions ------------------------------------------------------------------------------------

    def _band_of(self, request: RequestInfo) -> Priority:
        value = request.headers.get(self._header, "normal").strip().lower()
        return PRIORITY_NAMES.get(value, Priority.NORMAL)

    def _limit(self, model: str) -> int | None:
        return self._settings.models.get(model, self._settings.max_inflight_per_model)

    def _has_room(self, model: str) -> bool:
        if self._global_limit is not None and self._inflight >= self._global_limit:
            return False
        limit = self._limit(model)
        if limit is not None and self._by_model.get(model, 0) >= limit:
            return False
        return not self.saturated(model)

    def saturation(self, model: str) -> float:
        """The least loaded of the model's backends with a fresh scrape: min of max(queue/queue_norm, kv/kv_norm).

        The least, not the mean: while one backend has room the router sends requests there, so holding them
        at the gateway would only delay them (a mean let one backed-up or stuck engine, or one reporting a
        garbage figure, hold every request of the model while the others idled).

        Its inputs change only when a scrape lands or the model's backends change (the registry's
        `engine_version`), or as samples age: it is recomputed then, and at most every RECHECK_S otherwise."""
        now = time.monotonic()
        version = self._registry.engine_version
        cached = self._saturation.get(model)
        if cached is not None and cached[0] == version and now - cached[1] < RECHECK_S:
            return cached[2]
        value = self._saturation_now(model, now)
        if len(self._saturation) > 4096:
            self._saturation.clear()
        self._saturation[model] = (version, now, value)
        return value

    def _saturation_now(self, model: str, now: float) -> float:
        least: float | None = None
        queue_norm = self._settings.queue_norm
        kv_norm = self._settings.kv_norm
        stale_after = self._settings.stale_after
        for backend in self._registry.candidates(model):
            sample = fresh_sample(backend, now, stale_after)
            if sample is None:
                continue
            # figures outside what an engine can report (a negative queue, KV use over 100%) are clamped
            kv = min(max(sample.kv_usage, 0.0), 1.0)
            score = max(max(sample.waiting, 0.0) / queue_norm, kv / kv_norm)
            if least is None or score < least:
                least = score
        return 0.0 if least is None else least

    def saturated(self, model: str) -> bool:
        threshold = self._settings.saturation
        return threshold is not None and self.saturation(model) >= threshold

    def _take(self, model: str) -> None:
        self._inflight += 1
        self._by_model[model] = self._by_model.get(model, 0) + 1

    def _release(self, model: str) -> None:
        self._inflight -= 1
        left = self._by_model[model] - 1
        if left:
            self._by_model[model] = left
        else:
            del self._by_model[model]
        if self._waiting:
            self._dispatch()

    # -- the queue ------------------------------------------------------------------------------------

    async def _wait(self, model: str, tenant: str, band: Priority) -> None:
        settings = self._settings
        if band is Priority.LOW and (self.saturated(model) or self._waiting >= self._low_limit):
            self._reject(model, "saturated" if self.saturated(model) else "queue_full")
        if self._waiting >= settings.queue_size and not self._shed_below(band):
            self._reject(model, "queue_full")
        waiter = _Waiter(model, tenant, band, asyncio.get_running_loop().create_future())
        queue = self._bands[band].tenants.setdefault(tenant, deque())
        queue.append(waiter)
        self._bands[band].size += 1
        self._waiting += 1
        self._queued[model] = self._queued.get(model, 0) + 1
        self._dispatch()  # it may run at once: what blocked the fast path may concern other models only
        if not waiter.future.done():
            self._start_ticker()
        try:
            async with asyncio.timeout(settings.queue_timeout):
                await waiter.future
        except TimeoutError:
            if not self._granted(waiter):
                self._remove(waiter)
                self._reject(model, "queue_timeout")
        except asyncio.CancelledError:
            if self._granted(waiter):
                self._release(model)  # the slot was handed over as the client left
            else:
                self._remove(waiter)
            raise
        if waiter.rejection is not None:
            raise waiter.rejection

    @staticmethod
    def _granted(waiter: _Waiter) -> bool:
        future = waiter.future
        return future.done() and not future.cancelled() and waiter.rejection is None

    def _reject(self, model: str, reason: str) -> NoReturn:
        raise self._rejection(model, reason)

    def _rejection(self, model: str, reason: str) -> Overloaded:
        self._count(model, reason)
        messages = {
            "saturated": "The model's backends are saturated; low-priority requests are shed first.",
            "queue_full": "Too many requests are waiting for this model; retry later.",
            "queue_timeout": "The request waited too long for a free slot; retry later.",
            "shed": "The request was shed from the wait queue to make room for a higher-priority one.",
        }
        return Overloaded(messages[reason], reason, self._settings.retry_after)

    def _shed_below(self, band: Priority) -> bool:
        """Reject the newest waiter of the lowest band below `band`; False when there is none."""
        for lower in range(len(self._bands) - 1, band, -1):
            queues = self._bands[lower].tenants
            if not queues:
                continue
            while queues:
                tenant = next(reversed(queues))  # the tenant rotated in last
                victim = queues[tenant][-1]
                self._remove(victim)
                if victim.future.done():
                    continue  # it had left already (see _dispatch): its place is free, nobody is shed
                victim.rejection = self._rejection(victim.model, "shed")
                victim.future.set_result(None)
                return True
            return True  # room was made by taking out waiters that had left
        return False

    def _remove(self, waiter: _Waiter) -> None:
        band = self._bands[waiter.band]
        queue = band.tenants.get(waiter.tenant)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del band.tenants[waiter.tenant]
        band.size -= 1
        self._waiting -= 1
        left = self._queued[waiter.model] - 1
        if left:
            self._queued[waiter.model] = left
        else:
            del self._queued[waiter.model]

    def _dispatch(self) -> None:
        """Hand free slots to waiters: bands in priority order, tenants in rotation, FIFO per tenant."""
        saturated: dict[str, bool] = {}
        for band in self._bands:
            progress = True
            while band.size and progress:
                progress = False
                for tenant in list(band.tenants):
                    queue = band.tenants[tenant]
                    for waiter in queue:
                        if waiter.future.done():
                            # Its request left (client gone, queue timeout): cancelling the task cancelled the
                            # future at once, but the task has not run to take it out. A slot is no use to it.
                            self._remove(waiter)
                            progress = True
                            break
                        model = waiter.model
                        if not self._registry.candidates(model):
                            # Nothing serves its model any more (down, ejected, gone): 503 now, not a 429
                            # "retry later" at the end of its wait.
                            self._remove(waiter)
                            waiter.rejection = NoHealthyBackend.for_model(model, self._settings.retry_after)
                            waiter.future.set_result(None)
                            progress = True
                            break
                        if model not in saturated:
                            saturated[model] = self.saturated(model)
                        if saturated[model] or not self._has_limit_room(model):
                            continue
                        self._remove(waiter)
                        self._take(model)
                        waiter.future.set_result(None)
                        if tenant in band.tenants:
                            band.tenants.move_to_end(tenant)  # next grant goes to the next tenant
                        progress = True
                        break
                    if progress:
                        break
            if self._global_limit is not None and self._inflight >= self._global_limit:
                return

    def _has_limit_room(self, model: str) -> bool:
        if self._global_limit is not None and self._inflight >= self._global_limit:
            return False
        limit = self._limit(model)
        return limit is None or self._by_model.get(model, 0) < limit

    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """While anyone waits, look again periodically: saturation falls without any release here."""
        while self._waiting:
            await asyncio.sleep(RECHECK_S)
            self._dispatch()
