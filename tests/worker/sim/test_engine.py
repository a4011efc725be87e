"""The engine model on a fake clock: batching, prefix caching, LoRA slots, eviction, metrics."""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest

from worker.sim.config import SimConfig
from worker.sim.driver import EngineDriver
from worker.sim.engine import Engine, RequestState, SimRequest, step_duration_s
from worker.sim.metrics import SimMetrics

FAST = {"prefill_ms_per_token": 1.0, "decode_ms_per_token": 10.0, "decode_batch_factor": 0.1, "lora_load_ms": 50.0}


def make(**kw: object) -> Engine:
    return Engine(SimConfig(**{**FAST, **kw}))  # type: ignore[arg-type]


def req(prompt: list[int], out: int = 2, lora: str | None = None) -> SimRequest:
    return SimRequest(request_id=str(id(prompt)), prompt_token_ids=prompt, output_tokens=out, lora=lora)


def run(engine: Engine, t: float = 0.0) -> float:
    """Step until idle; returns the end time."""
    while engine.has_work():
        duration = engine.begin_step(t)
        assert duration is not None
        t += duration
        engine.end_step(t)
    return t


def ttft(r: SimRequest) -> float:
    assert r.first_token_at is not None
    return r.first_token_at - r.arrival


def test_step_duration_formula() -> None:
    cfg = SimConfig(**FAST)  # type: ignore[arg-type]
    assert step_duration_s(cfg, 1, 0, 0) == pytest.approx(0.010)
    assert step_duration_s(cfg, 3, 100, 1) == pytest.approx((10 * 1.2 + 100 + 50) / 1000)


def test_prefix_hit_raises_counter_and_cuts_ttft() -> None:
    engine = make()
    prompt = list(range(64))  # 4 full blocks of 16
    first = req(prompt)
    engine.add_request(first, 0.0)
    t = run(engine)
    assert engine.stats.prefix_hits == 0
    second = req(list(prompt))
    engine.add_request(second, t)
    run(engine, t)
    # all 4 blocks are cached, but the last prompt token is always recomputed: 3 blocks hit
    assert engine.stats.prefix_hits == 48
    assert engine.stats.prefix_queries == 128
    assert second.num_cached_tokens == 48
    assert ttft(first) == pytest.approx((10 + 64) / 1000)
    assert ttft(second) == pytest.approx((10 + 16) / 1000)


def test_prefix_sharing_is_per_adapter() -> None:
    engine = make(loras={"a": "/a"})
    engine.add_request(req(list(range(64))), 0.0)
    t = run(engine)
    engine.add_request(req(list(range(64)), lora="a"), t)
    run(engine, t)
    assert engine.stats.prefix_hits == 0


def test_max_num_seqs_queues_fifo() -> None:
    engine = make(max_num_seqs=2)
    reqs = [req([i] * 8, out=3) for i in range(3)]
    for r in reqs:
        engine.add_request(r, 0.0)
    duration = engine.begin_step(0.0) or 0.0
    assert [r.state for r in reqs] == [RequestState.RUNNING, RequestState.RUNNING, RequestState.WAITING]
    assert len(engine.running) == 2
    assert len(engine.waiting) == 1
    engine.end_step(duration)
    run(engine, duration)
    assert all(r.state is RequestState.FINISHED for r in reqs)
    assert reqs[2].scheduled_at is not None
    assert reqs[2].scheduled_at > 0
    assert reqs[1].finished_at is not None
    assert reqs[2].scheduled_at == pytest.approx(reqs[1].finished_at)


def test_decode_slows_with_batch() -> None:
    engine = make(max_num_seqs=8)
    solo = req([1] * 8, out=4)
    engine.add_request(solo, 0.0)
    run(engine)
    engine = make(max_num_seqs=8)
    batch = [req([i] * 8, out=4) for i in range(4)]
    for r in batch:
        engine.add_request(r, 0.0)
    run(engine)
    solo_itl = (solo.finished_at or 0) - (solo.first_token_at or 0)
    batch_itl = (batch[0].finished_at or 0) - (batch[0].first_token_at or 0)
    assert solo_itl == pytest.approx(3 * 0.010)
    assert batch_itl == pytest.approx(3 * 0.010 * (1 + 0.1 * 3))


def test_lora_slots_queue_and_load_cost() -> None:
    engine = make(max_loras=1, loras={"a": "/a", "b": "/b"})
    ra, rb, base = req([1] * 8, lora="a"), req([2] * 8, lora="b"), req([3] * 8)
    for r in (ra, rb, base):
        engine.add_request(r, 0.0)
    duration = engine.begin_step(0.0)
    # b waits for the single slot, the base request behind it still runs
    assert ra.state is RequestState.RUNNING
    assert rb.state is RequestState.WAITING
    assert base.state is RequestState.RUNNING
    assert engine.running_adapters() == ["a"]
    assert engine.waiting_adapters() == ["b"]
    assert duration == pytest.approx((10 * 1.1 + 16 + 50) / 1000)  # one adapter load
    engine.end_step(duration or 0.0)
    run(engine, duration or 0.0)
    assert rb.done
    assert rb.scheduled_at is not None
    assert ra.finished_at is not None
    assert rb.scheduled_at >= ra.finished_at
    assert engine.stats.lora_loads == 2


def test_resident_adapter_costs_nothing() -> None:
    engine = make(max_loras=1, loras={"a": "/a"})
    engine.add_request(req([1] * 8, lora="a"), 0.0)
    t = run(engine)
    second = req([2] * 8, lora="a")
    engine.add_request(second, t)
    assert engine.begin_step(t) == pytest.approx((10 + 8) / 1000)
    assert engine.stats.lora_loads == 1


def test_eviction_frees_blocks_lru() -> None:
    engine = make(num_gpu_blocks=8, block_size=4, max_model_len=32)
    a = req(list(range(16)), out=4)  # 4 prompt blocks + 1 output block
    engine.add_request(a, 0.0)
    duration = engine.begin_step(0.0) or 0.0
    assert engine.pool.num_used == 5
    assert engine.kv_usage() == pytest.approx(5 / 8)
    engine.end_step(duration)
    t = run(engine, duration)
    assert engine.pool.num_used == 0
    assert engine.pool.num_cached == 4  # prompt blocks stay findable
    assert len(engine.pool.lookup(a.hashes)) == 4
    b = req(list(range(100, 124)), out=4)  # 7 blocks: 4 free + 3 evicted from a's cache
    engine.add_request(b, t)
    duration = engine.begin_step(t) or 0.0
    assert engine.pool.num_used == 7
    assert len(engine.pool.lookup(a.hashes)) == 1  # a's tail blocks went first
    engine.end_step(t + duration)


def test_kv_pool_full_makes_requests_wait() -> None:
    engine = make(num_gpu_blocks=8, block_size=4, max_model_len=32)
    a, b = req([1] * 20, out=4), req([2] * 20, out=4)  # 6 blocks each
    engine.add_request(a, 0.0)
    engine.add_request(b, 0.0)
    duration = engine.begin_step(0.0) or 0.0
    assert (a.state, b.state) == (RequestState.RUNNING, RequestState.WAITING)
    engine.end_step(duration)
    run(engine, duration)
    assert b.state is RequestState.FINISHED


def test_abort_frees_slot_at_once() -> None:
    engine = make(max_num_seqs=1)
    a, b = req([1] * 8, out=50), req([2] * 8)
    engine.add_request(a, 0.0)
    engine.add_request(b, 0.0)
    engine.begin_step(0.0)
    engine.abort_request(a, 0.005)
    assert len(engine.running) == 0
    assert engine.pool.num_used == 0
    assert engine.end_step(0.01) == []  # the aborted request gets nothing
    run(engine, 0.01)
    assert a.state is RequestState.ABORTED
    assert b.state is RequestState.FINISHED
    assert engine.stats.finished == {"abort": 1, "length": 1}


def test_oversized_request_is_refused() -> None:
    engine = make(num_gpu_blocks=128, block_size=16, max_model_len=2048)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(req([1] * 2048, out=16), 0.0)


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_move_as_requests_run() -> None:
    engine = make()
    metrics = SimMetrics(engine, "m")
    r = req(list(range(32)), out=3)
    engine.add_request(r, 0.0)
    engine.begin_step(0.0)
    text = metrics.render().decode()
    assert _sample(text, "vllm:num_requests_running") == 1
    assert _sample(text, "vllm:kv_cache_usage_perc") > 0
    assert _sample(text, "vllm:prompt_tokens_total") == 32
    engine.end_step(0.042)
    run(engine, 0.042)
    text = metrics.render().decode()
    assert _sample(text, "vllm:num_requests_running") == 0
    assert _sample(text, "vllm:generation_tokens_total") == 3
    assert _sample(text, "vllm:time_to_first_token_seconds_count") == 1
    assert _sample(text, "vllm:time_to_first_token_seconds_sum") == pytest.approx(0.042)
    assert _sample(text, "vllm:inter_token_latency_seconds_count") == 2
    assert _sample(text, "vllm:e2e_request_latency_seconds_count") == 1
    assert _sample(text, "vllm:request_queue_time_seconds_count") == 1
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0' in text


def test_replay_matches_closed_form() -> None:
    from worker.sim.replay import replay

    cfg = SimConfig(**FAST, max_num_seqs=4)  # type: ignore[arg-type]
    reqs = [req([i] * 32, out=5) for i in range(4)]
    done = replay(cfg, [(0.0, r) for r in reqs])
    step1 = (10 * 1.3 + 4 * 32) / 1000  # all four prefill together in one batch of 4
    decode = 10 * 1.3 / 1000
    for r in done:
        assert ttft(r) == pytest.approx(step1)
        assert (r.finished_at or 0) - r.arrival == pytest.approx(step1 + 4 * decode)
    late = req([9] * 32, out=1)
    replay(cfg, [(1.0, late)])
    assert late.scheduled_at == 1.0


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    engine = make(max_num_batched_tokens=16)
    long, short = req([1] * 40, out=2), req([2] * 4, out=2)
    engine.add_request(long, 0.0)
    engine.add_request(short, 0.0)
    durations = []
    t = 0.0
    while long.first_token_at is None:
        d = engine.begin_step(t) or 0.0
        durations.append(d)
        t += d
        engine.end_step(t)
    # 40 prompt tokens at 16 a step: 16 + 16 + 8; the short request only gets budget in step 3
    assert durations[0] == pytest.approx((10 + 16) / 1000)
    assert durations[2] == pytest.approx((10 * 1.1 + 8 + 4) / 1000)
    assert len(durations) == 3
    assert short.first_token_at == pytest.approx(t)


def test_metrics_render_as_prometheus_client_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written exposition is generate_latest's, byte for byte, at every state of the engine."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.5)  # lora_requests_info's value: the time it is read
    engine = make()
    metrics = SimMetrics(engine, 'model "quoted" \\ name')
    assert metrics.render() == generate_latest(metrics.registry)
    engine.add_request(req(list(range(40)), out=4), 0.0)
    engine.begin_step(0.0)
    assert metrics.render() == generate_latest(metrics.registry)
    engine.end_step(0.05)
    run(engine, 0.05)
    assert metrics.render() == generate_latest(metrics.registry)
    driver = EngineDriver(engine)  # a server's metrics carry its driver's timeline health too
    driver.steps, driver.lag_sum_s, driver.lag_max_s, driver.resyncs = 12, 0.25, 0.125, 1
    served = SimMetrics(engine, "m", driver)
    assert served.render() == generate_latest(served.registry)
    assert b"sim:step_lag_max_seconds" in served.render()
