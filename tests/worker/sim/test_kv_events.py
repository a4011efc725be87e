"""KV cache events over real ZMQ sockets: what the simulator publishes against what its engine did.

Subscribers and replay clients are the conformance suite's (tests/conformance/kv_events_client.py: pyzmq +
msgspec); blocking socket calls run in a thread so the simulator keeps serving in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import zmq

from tests.conformance import kv_events_client as kv
from tests.worker.sim.conftest import RunningSim, SimFactory, sim_process
from worker.sim.cli import main as cli_main
from worker.sim.engine import Engine, RequestState, SimRequest
from worker.sim.kv_events import KVEventsSettings
from worker.sim.text import EOS_ID

EVENTS = KVEventsSettings(enable_kv_cache_events=True, endpoint="tcp://*:0", replay_endpoint="tcp://*:0")
BS = 4


class BlockIndex:
    """What a consumer learns from the events: the cached hashes, and the token ids each chain covers."""

    def __init__(self) -> None:
        self.hashes: set[int | bytes] = set()
        self.tokens_upto: dict[int | bytes, list[int]] = {}  # block hash -> all token ids of its chain

    def apply(self, messages: list[kv.Message]) -> None:
        for msg in messages:
            for event in msg.batch.events:
                if isinstance(event, kv.BlockStored):
                    prefix = [] if event.parent_block_hash is None else self.tokens_upto[event.parent_block_hash]
                    for i, h in enumerate(event.block_hashes):
                        self.hashes.add(h)
                        self.tokens_upto[h] = prefix + event.token_ids[: (i + 1) * event.block_size]
                elif isinstance(event, kv.BlockRemoved):
                    self.hashes.difference_update(event.block_hashes)
                else:
                    self.hashes.clear()


class EngineGate:
    """Holds a simulator's engine between two steps: from the end of the first step after which `when(engine)`
    is true until `release()`. While held, the engine schedules nothing and its driver waits; nothing else changes.

    A test that must act between two given steps cannot sleep or poll for that moment: the engine follows the
    wall clock, and after the event loop stalled (a loaded machine) it runs every step it missed at once, so it
    may run past the moment, even to the end of a request, before the test's next line runs."""

    def __init__(self, sim: RunningSim, monkeypatch: pytest.MonkeyPatch, when: Callable[[Engine], bool]) -> None:
        engine, self._driver = sim.app.state.engine, sim.app.state.driver
        self._held = asyncio.Event()
        self._released = False
        begin_step, end_step = engine.begin_step, engine.end_step

        def gated_begin(now: float) -> float | None:
            return None if self._held.is_set() and not self._released else begin_step(now)

        def gated_end(now: float) -> list[SimRequest]:
            out = end_step(now)
            if not self._released and when(engine):
                self._held.set()
            return out

        monkeypatch.setattr(engine, "begin_step", gated_begin)
        monkeypatch.setattr(engine, "end_step", gated_end)

    async def held(self) -> None:
        await asyncio.wait_for(self._held.wait(), 10)

    def release(self) -> None:
        self._released = True
        wake = self._driver._wake  # the driver waits on it after the engine reported nothing to schedule
        assert wake is not None
        wake.set()


async def sources(sim: RunningSim) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        return (await http.get("/kv_event_sources")).json()["0"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def subscribed(sim: RunningSim, topic: bytes = b"") -> AsyncIterator[kv.Subscriber]:
    sub = kv.Subscriber(kv.connect_address((await sources(sim))["endpoint"], sim.url), topic)
    try:
        await asyncio.sleep(0.3)  # the subscription must reach the publisher before the events it should see
        yield sub
    finally:
        sub.close()


async def received(sub: kv.Subscriber, quiet: float = 0.5, until: Callable[[list[kv.Message]], bool] | None = None
                   ) -> list[kv.Message]:  # fmt: skip
    """What arrives until nothing has for `quiet` seconds (or `until` holds)."""
    return await asyncio.to_thread(sub.messages, quiet, until)


async def replayed(sim: RunningSim, start: int) -> tuple[list[kv.Message], bool]:
    address = kv.connect_address((await sources(sim))["replay_endpoint"], sim.url)
    return await asyncio.to_thread(kv.replay, address, start)


def events_of(messages: list[kv.Message], kind: type) -> list[Any]:
    return [e for m in messages for e in m.batch.events if isinstance(e, kind)]


async def complete(http: httpx.AsyncClient, prompt: str | list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True, **extra}
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def kv_factory(sim_factory: SimFactory) -> SimFactory:
    def make(**overrides: Any) -> contextlib.AbstractAsyncContextManager[RunningSim]:
        return sim_factory(**{"kv_events": EVENTS, "block_size": BS, "enable_prompt_tokens_details": True,
                              **overrides})  # fmt: skip

    return make


async def test_stored_events_follow_the_engine_cache(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, subscribed(sim) as sub, httpx.AsyncClient(base_url=sim.url) as http:
        outs = [await complete(http, f"request {i}: " + "some words " * (i + 2), 9) for i in range(3)]
        messages = await received(sub)
        pool = sim.app.state.engine.pool
        index = BlockIndex()
        index.apply(messages)
        assert index.hashes == pool.cached_hashes()
    stored = events_of(messages, kv.BlockStored)
    assert stored
    for out in outs:
        choice = out["choices"][0]
        tokens = choice["prompt_token_ids"] + choice["token_ids"]
        # every block whose KV was computed: all tokens but the last one sampled
        full = (len(tokens) - 1) // BS
        chains = [t for t in index.tokens_upto.values() if t == tokens[: len(t)]]
        assert max(len(t) for t in chains) == full * BS
    for event in stored:
        assert event.block_size == BS
        assert len(event.token_ids) == BS * len(event.block_hashes)
        assert (event.medium, event.lora_name, event.lora_id, event.group_idx) == ("GPU", None, None, 0)
        assert event.extra_keys == [None] * len(event.block_hashes)
        assert event.kv_cache_spec_kind == "full_attention"
    assert [m.seq for m in messages] == list(range(len(messages)))


async def test_output_blocks_are_stored_as_they_fill(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, subscribed(sim) as sub, httpx.AsyncClient(base_url=sim.url) as http:
        out = await complete(http, "abcd" * 8, 12)  # 8 tokens, 2 blocks, then 2 of output (the last sampled uncomputed)
        messages = await received(sub)
    choice = out["choices"][0]
    tokens = choice["prompt_token_ids"] + choice["token_ids"]
    stored = events_of(messages, kv.BlockStored)
    assert [len(e.block_hashes) for e in stored] == [2, 1, 1]  # the prompt in one step, then one block a time
    assert [t for e in stored for t in e.token_ids] == tokens[:16]
    for before, after in itertools.pairwise(stored):
        assert after.parent_block_hash == before.block_hashes[-1]


async def test_chunked_prefill_stores_blocks_chunk_by_chunk(kv_factory: SimFactory) -> None:
    async with kv_factory(max_num_batched_tokens=8) as sim, subscribed(sim) as sub, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        out = await complete(http, "x" * 4 * 20, 1)  # 20 tokens: prefilled 8 + 8 + 4 in three steps
        messages = await received(sub)
    stored = events_of(messages, kv.BlockStored)
    assert [len(e.block_hashes) for e in stored] == [2, 2, 1]
    assert stored[0].parent_block_hash is None
    assert [t for e in stored for t in e.token_ids] == out["choices"][0]["prompt_token_ids"]
    assert len(messages) == 3  # one batch a step


async def test_eviction_publishes_block_removed(kv_factory: SimFactory) -> None:
    async with kv_factory(num_gpu_blocks=12, max_model_len=48) as sim, subscribed(sim) as sub, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        first = await complete(http, "a" * 4 * 32, 4)  # 8 prompt blocks + 1 output block (never full)
        # needs 9 blocks: 3 never used, the first's unhashed output block, and 5 of its cached blocks, LRU first
        await complete(http, "b" * 4 * 32, 4)
        messages = await received(sub)
        index = BlockIndex()
        index.apply(messages)
        cached = sim.app.state.engine.pool.cached_hashes()
    stored_first = events_of(messages[:1], kv.BlockStored)[0]
    removed = [h for e in events_of(messages, kv.BlockRemoved) for h in e.block_hashes]
    assert len(removed) == 5
    assert set(removed) <= set(stored_first.block_hashes)
    assert all(len(e.block_hashes) == 1 for e in events_of(messages, kv.BlockRemoved))  # one event a block
    # LRU: the first request's tail went first, its head is still cached
    assert set(stored_first.block_hashes[:2]) <= index.hashes
    assert index.hashes == cached
    assert len(first["choices"][0]["token_ids"]) == 4
    batch = next(m.batch.events for m in messages if events_of([m], kv.BlockRemoved))
    kinds = [type(e).__name__ for e in batch]
    assert kinds == sorted(kinds, key=lambda k: k != "BlockRemoved")  # removals come before the step's stores


async def test_replay_after_a_late_join_fills_the_gap(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        for i in range(3):
            await complete(http, f"early {i} " * 4, 2)
        async with subscribed(sim) as sub:
            await complete(http, "late " * 4, 2)
            live = await received(sub)
            missed, ended = await replayed(sim, 0)
            tail, tail_ended = await replayed(sim, live[0].seq)
            index = BlockIndex()
            index.apply([m for m in missed if m.seq < live[0].seq] + live)
            assert index.hashes == sim.app.state.engine.pool.cached_hashes()
    assert live[0].seq > 0  # the subscriber joined late: seqs before it never reached it
    assert ended
    assert tail_ended
    assert [m.seq for m in missed] == list(range(live[-1].seq + 1))
    assert [m.seq for m in tail] == [m.seq for m in live]
    assert [m.batch for m in tail] == [m.batch for m in live]  # the same batches, byte for byte decoded alike


async def test_replay_buffer_holds_buffer_steps_batches(kv_factory: SimFactory) -> None:
    async with kv_factory(kv_events=EVENTS.replace(buffer_steps=2)) as sim, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        for i in range(4):
            await complete(http, f"prompt {i} " * 4, 1)
        got, ended = await replayed(sim, 0)
    assert ended
    assert [m.seq for m in got] == [2, 3]


async def test_replay_ignores_a_malformed_request(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        await complete(http, "something " * 4, 1)
        address = kv.connect_address((await sources(sim))["replay_endpoint"], sim.url)

        def ask_without_delimiter() -> bool:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            sock.send_multipart([(0).to_bytes(8, "big")])  # vLLM wants [b"", seq]: no answer
            try:
                return bool(sock.poll(500))
            finally:
                sock.close()

        assert not await asyncio.to_thread(ask_without_delimiter)
        got, ended = await replayed(sim, 0)  # and it still serves well-formed ones
    assert ended
    assert got


async def test_reset_prefix_cache_sends_all_blocks_cleared_with_the_next_step(
    kv_factory: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with kv_factory(server_dev_mode=True) as sim, subscribed(sim) as sub, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        engine = sim.app.state.engine
        await complete(http, "cached prompt " * 4, 1)
        gate = EngineGate(sim, monkeypatch, lambda e: bool(e.running))  # the reset must find it running
        running = asyncio.create_task(complete(http, "long answer", 400))
        await gate.held()
        busy = (await http.post("/reset_prefix_cache")).json()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        gate.release()
        # the request is aborted once the server sees the client gone (the engine has no event to wait for)
        while engine.has_work():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        before = await received(sub)
        idle = (await http.post("/reset_prefix_cache")).json()
        quiet = await received(sub, quiet=0.3)
        assert sim.app.state.engine.pool.cached_hashes() == set()
        await complete(http, "after the reset " * 4, 1)
        after = await received(sub)
    assert busy == {"success": False}  # a request held blocks
    assert idle == {"success": True}
    assert events_of(before, kv.AllBlocksCleared) == []
    assert quiet == []  # an idle engine publishes nothing, as vLLM
    first = after[0].batch.events
    assert isinstance(first[0], kv.AllBlocksCleared)
    assert isinstance(first[1], kv.BlockStored)
    assert first[1].parent_block_hash is None


async def test_forced_reset_with_running_requests(kv_factory: SimFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with kv_factory(server_dev_mode=True, decode_ms_per_token=5) as sim, subscribed(sim) as sub, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        engine = sim.app.state.engine
        # the reset must land while the request runs with blocks in the prefix cache (had it finished first, the
        # idle engine would hold the AllBlocksCleared back, as vLLM does, and nothing would store blocks again)
        gate = EngineGate(sim, monkeypatch, lambda e: any(r.num_registered for r in e.running))
        running = asyncio.create_task(complete(http, "abcdefgh", 40))
        await gate.held()
        (req,) = engine.running
        assert engine.pool.cached_hashes()
        r = await http.post("/reset_prefix_cache?reset_running_requests=true")
        assert req.state is RequestState.RUNNING
        gate.release()
        out = await running
        messages = await received(sub)
        index = BlockIndex()
        index.apply(messages)
        assert index.hashes == sim.app.state.engine.pool.cached_hashes()
    assert r.json() == {"success": True}
    cleared = next(i for i, m in enumerate(messages) if events_of([m], kv.AllBlocksCleared))
    restored = events_of(messages[cleared:], kv.BlockStored)
    assert restored[0].parent_block_hash is None  # the running request stores its blocks again from block 0
    tokens = out["choices"][0]["prompt_token_ids"] + out["choices"][0]["token_ids"]
    assert [t for e in restored for t in e.token_ids] == tokens[: (len(tokens) - 1) // BS * BS]


async def test_reset_route_needs_dev_mode(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        assert (await http.post("/reset_prefix_cache")).status_code == 404


async def test_cached_tokens_are_the_engine_hits(kv_factory: SimFactory) -> None:
    def hits(text: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith("vllm:prefix_cache_hits_total{"))
        return float(line.rsplit(" ", 1)[1])

    prompt = "a prompt that is shared by three requests"  # 41 characters: 11 tokens
    async with kv_factory() as sim, httpx.AsyncClient(base_url=sim.url) as http:
        details = []
        for stream in (False, True, False):
            before = hits((await http.get("/metrics")).text)
            body = {"prompt": prompt, "max_tokens": 2, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
                lines = (await http.post("/v1/completions", json=body)).text.split("\n\n")
                usage = json.loads(lines[-3][len("data: ") :])["usage"]
            else:
                usage = (await http.post("/v1/completions", json=body)).json()["usage"]
            details.append(usage["prompt_tokens_details"])
            assert usage["prompt_tokens_details"]["cached_tokens"] == hits((await http.get("/metrics")).text) - before
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
        first_chat = (await http.post("/v1/chat/completions", json=chat)).json()["usage"]
        second_chat = (await http.post("/v1/chat/completions", json=chat)).json()["usage"]
    assert details[0] == {"cached_tokens": 0, "created_cache_tokens": None, "multimodal_tokens": None}
    assert details[1] == {"cached_tokens": 8}  # streamed: without the nulls; (11 - 1) // 4 blocks
    assert details[2]["cached_tokens"] == 8
    n = first_chat["prompt_tokens"]
    assert first_chat["prompt_tokens_details"]["created_cache_tokens"] == n // BS * BS
    assert second_chat["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BS * BS
    assert second_chat["prompt_tokens_details"]["created_cache_tokens"] == n // BS * BS - (n - 1) // BS * BS


async def test_without_the_flag_there_are_no_prompt_tokens_details(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        usage = (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).json()["usage"]
        sources_body = (await http.get("/kv_event_sources")).json()
    assert usage["prompt_tokens_details"] is None
    assert sources_body == {}


async def test_hash_seed_changes_hashes_not_tokens(kv_factory: SimFactory) -> None:
    stored = []
    for seed in (1, 2):
        async with kv_factory(kv_hash_seed=seed) as sim, subscribed(sim) as sub, \
                httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
            await complete(http, "the same prompt on two engines", 1, seed=5)
            stored.append(events_of(await received(sub), kv.BlockStored))
    a, b = ([t for e in s for t in e.token_ids] for s in stored)
    assert a == b
    assert a
    assert not {h for e in stored[0] for h in e.block_hashes} & {h for e in stored[1] for h in e.block_hashes}
    assert all(0 <= h < 2**64 for e in stored[0] + stored[1] for h in e.block_hashes)


async def test_report_mode_full_announces_prefix_hits(kv_factory: SimFactory) -> None:
    prompt = "cached " * 6 + "x"  # 11 tokens: the 2 full blocks hit, the rest is no full block
    async with kv_factory() as sim, subscribed(sim) as sub, httpx.AsyncClient(base_url=sim.url) as http:
        await complete(http, prompt, 1)
        first = events_of(await received(sub), kv.BlockStored)
        await complete(http, prompt, 1)
        incremental = await received(sub, quiet=0.3)
        await complete(http, prompt, 1, vllm_xargs={"kv_cache_report_mode": "full"})
        full = events_of(await received(sub), kv.BlockStored)
    assert events_of(incremental, kv.BlockStored) == []  # hits are not announced by default
    assert full[0].parent_block_hash is None
    assert full[0].block_hashes == first[0].block_hashes == full[0].block_hashes[:2]
    assert full[0].token_ids == first[0].token_ids


async def test_lora_blocks_name_the_adapter(kv_factory: SimFactory) -> None:
    async with kv_factory(loras={"la": "/la", "lb": "/lb"}, allow_runtime_lora=True) as sim, subscribed(sim) as sub, \
            httpx.AsyncClient(base_url=sim.url) as http:  # fmt: skip
        await http.post("/v1/load_lora_adapter", json={"lora_name": "lc", "lora_path": "/lc"})
        for model in ("la", "lb", "lc", "sim"):
            await complete(http, "the same prompt for every adapter", 1, model=model, seed=1)
        stored = events_of(await received(sub), kv.BlockStored)
    by_name = {e.lora_name: e for e in stored}
    assert {name: e.lora_id for name, e in by_name.items()} == {"la": 1, "lb": 2, "lc": 3, None: None}
    assert by_name["lb"].extra_keys == [("lb",)] * len(by_name["lb"].block_hashes)
    assert len({e.block_hashes[0] for e in stored}) == 4  # adapters never share blocks
    assert len({tuple(e.token_ids) for e in stored}) == 1


async def test_topic_frames_every_message(kv_factory: SimFactory) -> None:
    async with kv_factory(kv_events=EVENTS.replace(topic="kv@sim")) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        async with subscribed(sim, b"kv@sim") as mine, subscribed(sim, b"other") as other:
            await complete(http, "topic check " * 3, 1)
            got, missed = await received(mine), await received(other, quiet=0.2)
        replay, _ = await replayed(sim, 0)
    assert got
    assert {m.topic for m in got} == {b"kv@sim"}
    assert missed == []
    assert {m.topic for m in replay} == {b"kv@sim"}


async def test_connect_endpoint_reaches_a_binding_subscriber(sim_factory: SimFactory) -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:0")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    settings = KVEventsSettings(enable_kv_cache_events=True, endpoint=endpoint)
    frames: list[bytes] = []
    try:
        async with sim_factory(kv_events=settings, block_size=BS) as sim, httpx.AsyncClient(base_url=sim.url) as http:
            for i in range(30):  # until the connection and subscription are up (PUB drops what comes before)
                await complete(http, f"pushed to a bound SUB, try {i}", 1)
                if await asyncio.to_thread(sub.poll, 100):
                    frames = sub.recv_multipart()
                    break
            src = (await http.get("/kv_event_sources")).json()["0"]
    finally:
        sub.close()
    assert len(frames) == 3
    assert kv.decode(frames[2]).events
    assert src["endpoint"] == endpoint
    assert src["replay_endpoint"] is None


async def test_an_unread_subscriber_never_slows_the_streams(kv_factory: SimFactory) -> None:
    async with kv_factory(kv_events=EVENTS.replace(hwm=1), max_num_seqs=64) as sim, subscribed(sim), \
            httpx.AsyncClient(base_url=sim.url, limits=httpx.Limits(max_connections=64)) as http:  # fmt: skip
        started = time.monotonic()
        outs = await asyncio.gather(*(complete(http, f"stream {i} " * 8, 40) for i in range(64)))
        elapsed = time.monotonic() - started
        lag = sim.app.state.driver.lag_max_s
    assert all(len(o["choices"][0]["token_ids"]) == 40 for o in outs)
    assert elapsed < 2.0  # 40 steps of ~3 ms; a PUB socket over its high-water mark drops, it does not wait
    assert lag < 0.2


async def test_stop_and_eos_tokens_are_in_the_stored_ids(kv_factory: SimFactory) -> None:
    async with kv_factory() as sim, subscribed(sim) as sub, httpx.AsyncClient(base_url=sim.url) as http:
        out = (await http.post("/v1/completions", json={"prompt": "natural end", "max_tokens": 200, "seed": 4,
                                                         "return_token_ids": True})).json()  # fmt: skip
        stored = events_of(await received(sub), kv.BlockStored)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"][-1] == EOS_ID
    tokens = choice["prompt_token_ids"] + choice["token_ids"]
    assert [t for e in stored for t in e.token_ids] == tokens[: (len(tokens) - 1) // BS * BS]


# ----- the command line -----


def _free_port_pair() -> int:
    """A port P with P and P+1 free (a PUB/replay pair), and P+2, P+3 for a second server."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 3 > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for i in range(4):
                    t = stack.enter_context(socket.socket())
                    t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port run")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "must be a JSON object"),
        ('{"enable_kv_cache_events": true, "bogus": 1}', "unknown key(s) bogus"),
        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events must be bool"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher must be 'null' or 'zmq'"),
        ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "is not a ZMQ endpoint"),
        ('{"enable_kv_cache_events": true, "buffer_steps": 0}', "buffer_steps must be >= 1"),
        ('{"enable_kv_cache_events": true, "hwm": true}', "hwm must be int"),
    ],
)
def test_bad_kv_events_config_is_a_clear_error(raw: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--served-model-name", "m", "--port", "0", "--kv-events-config", raw]) == 2
    err = capsys.readouterr().err
    assert "--kv-events-config" in err
    assert message in err


def test_busy_event_port_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"})
        assert cli_main(["--served-model-name", "m", "--port", "0", "--kv-events-config", cfg]) == 2
    assert f"cannot bind tcp://*:{port}" in capsys.readouterr().err


def test_count_gives_each_server_its_event_ports() -> None:
    base, http_base = _free_port_pair(), _free_port_pair()
    cfg = json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{base}",
                      "replay_endpoint": f"tcp://*:{base + 1}"})  # fmt: skip
    with sim_process("--served-model-name", "m", "--count", "2", "--port-base", str(http_base),
                     "--decode-ms-per-token", "1", "--block-size", "4", "--kv-events-config", cfg,
                     count=2) as sim:  # fmt: skip
        found = [httpx.get(u + "/kv_event_sources").json()["0"] for u in sim.urls]
        subs = [kv.Subscriber(f"tcp://127.0.0.1:{base + 2 * i}") for i in range(2)]
        try:
            time.sleep(0.3)
            httpx.post(sim.urls[1] + "/v1/completions", json={"prompt": "only on the second", "max_tokens": 1})
            got = [s.messages(timeout=0.5) for s in subs]
        finally:
            for s in subs:
                s.close()
        replay, ended = kv.replay(f"tcp://127.0.0.1:{base + 3}", 0)
    assert [(f["endpoint"], f["replay_endpoint"]) for f in found] == [
        (f"tcp://*:{base}", f"tcp://*:{base + 1}"), (f"tcp://*:{base + 2}", f"tcp://*:{base + 3}")]  # fmt: skip
    assert got[0] == []
    assert [m.seq for m in got[1]] == [0]
    assert ended
    assert [m.batch for m in replay] == [m.batch for m in got[1]]


def test_flags_accepted_as_vllm_spells_them() -> None:
    from worker.sim.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args([
        "--served-model-name", "m", "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--kv-events-config", '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", '
        '"replay_endpoint": "tcp://*:5558", "topic": "t", "buffer_steps": 5, "hwm": 7, "max_queue_size": 9}',
    ]))  # fmt: skip
    assert cfg.enable_prompt_tokens_details
    assert cfg.kv_events.publishing
    assert cfg.kv_events.as_dict() == {"enable_kv_cache_events": True, "publisher": "zmq",
                                       "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558",
                                       "buffer_steps": 5, "hwm": 7, "max_queue_size": 9, "topic": "t"}  # fmt: skip
    off = config_from_args(build_parser().parse_args(["--served-model-name", "m", "--kv-events-config", "{}"]))
    assert off.kv_events.publisher == "null"  # as vLLM: the publisher defaults by enable_kv_cache_events
    assert not off.kv_events.publishing
