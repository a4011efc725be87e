"""Admission control on one event loop: limits, the bounded queue, 429s, priorities and tenant fairness."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.errors import NoHealthyBackend, Overloaded, error_parts
from gateway.fleet.registry import BackendSpec, EngineSample, Registry
from gateway.metrics import Metrics
from gateway.routing.admission import Admission
from gateway.routing.request import RequestInfo
from gateway.routing.settings import AdmissionSettings


def build(**settings: Any) -> tuple[Admission, Registry, Metrics]:
    registry = Registry()
    registry.reconcile([BackendSpec("http://a:8000"), BackendSpec("http://b:8000")])
    for backend in registry.backends:
        registry.set_models(backend, [{"id": "m"}, {"id": "other"}])
    metrics = Metrics(registry)
    return Admission(AdmissionSettings(**settings), registry, metrics), registry, metrics


def info(model: str = "m", tenant: str = "", priority: str | None = None) -> RequestInfo:
    headers = {"x-switchyard-priority": priority} if priority else {}
    return RequestInfo(model=model, route="/v1/completions", headers=headers, tenant=tenant)


class Holder:
    """Runs `admit` in a task that keeps its slot until told to let go; records the admission order."""

    def __init__(self, admission: Admission, order: list[str]) -> None:
        self.admission = admission
        self.order = order

    def start(self, name: str, request: RequestInfo) -> tuple[asyncio.Task[None], asyncio.Event]:
        release = asyncio.Event()

        async def run() -> None:
            async with self.admission.admit(request):
                self.order.append(name)
                await release.wait()

        return asyncio.create_task(run()), release


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def rejected(metrics: Metrics, model: str, reason: str) -> float:
    value = metrics.registry.get_sample_value("switchyard_rejected_requests_total", {"model": model, "reason": reason})
    return value or 0.0


@pytest.fixture
def order() -> list[str]:
    return []


async def test_global_limit_queues_and_a_release_admits_the_next(order: list[str]) -> None:
    admission, _, _ = build(max_inflight=2)
    holder = Holder(admission, order)
    started = [holder.start(name, info()) for name in "abc"]
    await settle()
    assert order == ["a", "b"]
    assert admission.waiting == 1
    started[0][1].set()
    await settle()
    assert order == ["a", "b", "c"]
    assert admission.inflight == 2
    for _, release in started:
        release.set()
    await asyncio.gather(*(task for task, _ in started))
    assert admission.inflight == 0
    assert admission.waiting == 0


async def test_per_model_limit_does_not_hold_other_models(order: list[str]) -> None:
    admission, _, _ = build(models={"m": 1})
    holder = Holder(admission, order)
    tasks = [holder.start("m1", info("m")), holder.start("m2", info("m")), holder.start("o1", info("other"))]
    await settle()
    assert order == ["m1", "o1"]
    for _task, release in tasks:
        release.set()
    await asyncio.gather(*(task for task, _ in tasks))
    assert order == ["m1", "o1", "m2"]


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
async def test_a_full_queue_of_one_model_neither_holds_nor_sheds_for_another(order: list[str], priority: str) -> None:
    """Another model's waiters fill the queue, held by their own model's limit: a request for a model with
    room runs at once, at any priority, and sheds none of them."""
    admission, _, metrics = build(max_inflight_per_model=1, queue_size=2)
    holder = Holder(admission, order)
    tasks = [holder.start(f"m{i}", info("m")) for i in range(3)]
    await settle()
    assert (order, admission.waiting) == (["m0"], 2)
    other = holder.start("other", info("other", priority=priority))
    await settle()
    assert order == ["m0", "other"]
    assert admission.waiting == 2
    assert rejected(metrics, "m", "shed") == rejected(metrics, "other", "queue_full") == 0
    for _task, release in [*tasks, other]:
        release.set()
    await asyncio.gather(*(task for task, _ in [*tasks, other]))
    assert order == ["m0", "other", "m1", "m2"]


async def test_a_request_does_not_pass_a_waiter_of_its_own_model(order: list[str]) -> None:
    """Room that opened for a model (its saturation fell) goes to its waiters first, not to a newcomer."""
    admission, _, _ = build(max_inflight_per_model=1)
    holder = Holder(admission, order)
    first, _ = holder.start("first", info("m"))
    waiter = holder.start("waiter", info("m"))
    await settle()
    assert not admission.try_enter(info("m"))  # its model has a waiter: through the queue, behind it
    first.cancel()
    await settle()
    assert order == ["first", "waiter"]
    waiter[1].set()
    await waiter[0]


async def test_full_queue_answers_429_with_retry_after_and_reason(order: list[str]) -> None:
    admission, _, metrics = build(max_inflight=1, queue_size=1, retry_after=3)
    holder = Holder(admission, order)
    tasks = [holder.start("a", info()), holder.start("b", info())]
    await settle()
    with pytest.raises(Overloaded) as caught:
        async with admission.admit(info()):
            pass
    status, headers, body = error_parts(caught.value)
    assert status == 429
    assert (b"retry-after", b"3") in headers
    assert (b"x-switchyard-reject-reason", b"queue_full") in headers
    assert b'"code":"queue_full"' in body
    assert b"rate_limit_exceeded" in body
    assert rejected(metrics, "m", "queue_full") == 1
    for _task, release in tasks:
        release.set()
    await asyncio.gather(*(task for task, _ in tasks))


async def test_waiting_too_long_is_a_429(order: list[str]) -> None:
    admission, _, metrics = build(max_inflight=1, queue_timeout=0.05)
    holder = Holder(admission, order)
    task, release = holder.start("a", info())
    await settle()
    with pytest.raises(Overloaded) as caught:
        async with admission.admit(info()):
            pass
    assert caught.value.reason == "queue_timeout"
    assert admission.waiting == 0
    assert rejected(metrics, "m", "queue_timeout") == 1
    release.set()
    await task


async def test_priorities_high_first_then_normal_then_low(order: list[str]) -> None:
    admission, _, _ = build(max_inflight=1)
    holder = Holder(admission, order)
    first = holder.start("first", info())
    await settle()
    waiting = [holder.start(p, info(priority=p)) for p in ("low", "normal", "high")]
    await settle()
    for _, release in [first, *waiting]:
        release.set()
    await asyncio.gather(*(task for task, _ in [first, *waiting]))
    assert order == ["first", "high", "normal", "low"]


async def test_tenants_take_turns_within_a_priority(order: list[str]) -> None:
    admission, _, _ = build(max_inflight=1)
    holder = Holder(admission, order)
    first = holder.start("first", info(tenant="x"))
    await settle()
    waiting = [holder.start(f"a{i}", info(tenant="a")) for i in range(3)] + [holder.start("b0", info(tenant="b"))]
    await settle()
    for _, release in [first, *waiting]:
        release.set()
    await asyncio.gather(*(task for task, _ in [first, *waiting]))
    assert order == ["first", "a0", "b0", "a1", "a2"]


async def test_a_full_queue_sheds_low_priority_for_a_higher_one(order: list[str]) -> None:
    admission, _, metrics = build(max_inflight=1, queue_size=2, low_priority_queue_share=1.0)
    holder = Holder(admission, order)
    first = holder.start("first", info())
    await settle()
    lows = [holder.start(f"low{i}", info(priority="low")) for i in range(2)]
    await settle()
    high = holder.start("high", info(priority="high"))
    await settle()
    with pytest.raises(Overloaded) as caught:
        await lows[1][0]
    assert caught.value.reason == "shed"
    assert rejected(metrics, "m", "shed") == 1
    for _, release in [first, lows[0], high]:
        release.set()
    await asyncio.gather(first[0], lows[0][0], high[0])
    assert order == ["first", "high", "low0"]


async def test_saturated_pool_queues_normal_and_rejects_low(order: list[str]) -> None:
    admission, registry, metrics = build(saturation=1.0)
    for backend in registry.backends:
        backend.engine = EngineSample(waiting=10, running=5, kv_usage=0.5, at=time.monotonic())
    assert admission.saturation("m") == pytest.approx(2.0)
    with pytest.raises(Overloaded) as caught:
        async with admission.admit(info(priority="low")):
            pass
    assert caught.value.reason == "saturated"
    assert rejected(metrics, "m", "saturated") == 1
    holder = Holder(admission, order)
    task, release = holder.start("normal", info())
    await settle()
    assert order == []
    assert admission.waiting == 1
    for backend in registry.backends:  # the queues drain: the next scrape lets it through
        backend.engine = EngineSample(waiting=0, running=5, kv_usage=0.5, at=time.monotonic())
    await asyncio.sleep(0.15)
    assert order == ["normal"]
    release.set()
    await task


async def test_stale_samples_do_not_count_as_saturation() -> None:
    admission, registry, _ = build(saturation=1.0, stale_after=1.0)
    for backend in registry.backends:
        backend.engine = EngineSample(waiting=50, running=5, kv_usage=1.0, at=time.monotonic() - 10)
    assert admission.saturation("m") == 0.0
    async with admission.admit(info(priority="low")):
        assert admission.inflight == 1


async def test_a_client_leaving_the_queue_frees_its_place(order: list[str]) -> None:
    admission, _, _ = build(max_inflight=1)
    holder = Holder(admission, order)
    first = holder.start("first", info())
    second = holder.start("second", info())
    await settle()
    assert admission.waiting == 1
    second[0].cancel()
    await settle()
    assert admission.waiting == 0
    first[1].set()
    await first[0]
    assert admission.inflight == 0
    assert order == ["first"]


async def test_a_waiter_that_left_is_passed_over_and_its_slot_goes_to_the_next() -> None:
    """A client that leaves (or a queue timeout) cancels its request's task, which cancels the future it waits
    on at once; the task takes itself out of the queue only when it next runs. A slot freed in between must
    go to the next waiter: handing it to the one that left raised InvalidStateError and leaked the slot for
    good, until every request of the model was refused."""
    admission, _, _ = build(max_inflight_per_model=1)
    assert admission.try_enter(info())
    gone = asyncio.create_task(admission.enter(info()))
    after = asyncio.create_task(admission.enter(info()))
    await settle()
    assert admission.waiting == 2
    gone.cancel()  # its future is cancelled now; its task has not run yet
    admission.leave("m")  # the slot is freed before `gone` runs: it must go to `after`
    await settle()
    assert after.done()
    assert after.exception() is None
    assert (admission.inflight, admission.waiting) == (1, 0)
    with pytest.raises(asyncio.CancelledError):
        await gone
    admission.leave("m")
    assert (admission.inflight, admission.waiting) == (0, 0)


async def test_shedding_passes_over_a_waiter_that_left() -> None:
    """The same for shedding: a high-priority request finds the queue full, and the lower one to shed has left
    but not yet run. Its place is free: nobody is shed, and the request that arrived did not fail."""
    admission, _, metrics = build(max_inflight_per_model=1, queue_size=1)
    assert admission.try_enter(info())
    low = asyncio.create_task(admission.enter(info()))  # normal priority: below high
    await settle()
    assert admission.waiting == 1
    high = asyncio.create_task(admission.enter(info(priority="high")))  # runs before `low` learns it left
    low.cancel()
    await settle()
    assert not high.done()
    assert admission.waiting == 1
    assert rejected(metrics, "m", "shed") == 0
    admission.leave("m")
    await settle()
    assert high.done()
    assert high.exception() is None
    with pytest.raises(asyncio.CancelledError):
        await low
    admission.leave("m")
    assert (admission.inflight, admission.waiting) == (0, 0)


async def test_one_backed_up_backend_does_not_saturate_a_model_another_has_room_for() -> None:
    """A stuck engine (its queue never drains), or one reporting garbage, must not hold every request of the
    model at the gateway while another backend idles: the router would send them there."""
    admission, registry, _ = build(saturation=1.0)
    stuck, idle = registry.backends
    now = time.monotonic()
    stuck.engine = EngineSample(waiting=11, running=1, kv_usage=1e9, at=now)
    idle.engine = EngineSample(waiting=-1000, running=0, kv_usage=-3.0, at=now)  # clamped: an idle engine
    assert admission.saturation("m") == 0.0
    assert not admission.saturated("m")
    assert admission.try_enter(info(priority="low"))
    admission.leave("m")
    registry.record_engine(idle, EngineSample(waiting=6, running=4, kv_usage=0.5, at=time.monotonic()))
    assert admission.saturation("m") == pytest.approx(1.2)  # both full now: the least loaded one says so
    assert admission.saturated("m")


async def test_waiters_of_a_model_nothing_serves_any_more_get_503_at_once() -> None:
    """Its backends went down while it waited: a 429 "retry later" at the end of the queue timeout would be
    both late and wrong; the gatekeeper answers a newcomer 503 at once, and so are the waiters."""
    admission, registry, metrics = build(max_inflight_per_model=1, queue_timeout=30)
    assert admission.try_enter(info())
    waiter = asyncio.create_task(admission.enter(info()))
    other = asyncio.create_task(admission.enter(info("other")))  # another model, served by the same backends
    await settle()
    for backend in registry.backends:
        registry.set_models(backend, [{"id": "other"}])  # "m" is no longer served anywhere
    await asyncio.sleep(0.2)
    assert waiter.done()
    with pytest.raises(NoHealthyBackend) as caught:
        await waiter
    assert error_parts(caught.value)[0] == 503
    assert other.done()
    assert other.exception() is None  # "other" had room all along
    assert rejected(metrics, "m", "queue_timeout") == 0
    admission.leave("m")
    admission.leave("other")
    assert (admission.inflight, admission.waiting) == (0, 0)
