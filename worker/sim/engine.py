"""The engine model: continuous batching over a paged, prefix-cached KV pool with LoRA slots.

Pure and synchronous; the caller supplies the time (`now`, seconds) so tests can drive it with a
fake clock and `worker.sim.replay` can predict timings offline. The HTTP server drives it in real
time from one task per server (`driver.EngineDriver`).

One engine *step* works like a vLLM (V1, chunked prefill) scheduler iteration:

1. Token budget: a step processes at most `max_num_batched_tokens` tokens. Running requests go
   first, in admission order: a decoding request takes 1 token, a request still in prefill takes
   the next chunk of its uncached prompt (as much as the budget has left).
2. Admission, FIFO over the waiting queue, while budget is left. A request is admitted while fewer
   than `max_num_seqs` run, its LoRA adapter is already in the batch or a LoRA slot is free (fewer
   than `max_loras` distinct adapters running; a request that must wait for a slot is skipped and
   keeps its place), and the KV pool can hold its whole footprint, ceil((prompt + output) /
   block_size) blocks, minus its prefix-cache hits. A request that does not fit in the KV pool
   stops admission (head-of-line, as vLLM does). The footprint is reserved up front, so the
   simulator never preempts (`vllm:num_preemptions_total` stays 0).
3. Duration (see `step_duration_s`):
       decode_ms_per_token * (1 + decode_batch_factor * (batch - 1))
     + prefill_ms_per_token * (prompt tokens computed in this step)
     + lora_load_ms * (adapters loaded into a GPU slot in this step)
   where batch is the number of requests in the step. The GPU slots hold `max_loras` adapters in
   LRU order; an adapter already resident costs nothing.
4. At the end of the step every decoding request gets one token, and so does each request whose
   prefill completed in this step (its first token: TTFT). A request that has produced all its
   tokens finishes and releases its blocks.
5. Prefix caching as vLLM's: at the end of a step every block whose tokens all have their KV
   computed (prompt chunks, and output blocks once the request knows its output token ids)
   becomes findable, the last sampled token not counting (it is computed in the next step).
   With KV events on, each request that cached blocks in the step adds one `BlockStored`, each
   eviction a `BlockRemoved`, a prefix-cache reset an `AllBlocksCleared`; the driver publishes
   the step's events as one batch (`take_kv_events`).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from worker.sim.config import SimConfig
from worker.sim.kv_cache import BlockPool, block_hashes, extend_hashes, root_hash
from worker.sim.kv_events import MEDIUM_GPU, SPEC_KIND_FULL_ATTENTION, AllBlocksCleared, BlockStored, KVEvent


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class SimRequest:
    """One generation request as the engine sees it: token counts, adapter and timestamps."""

    request_id: str
    prompt_token_ids: list[int]
    output_tokens: int  # how many tokens it will produce before finishing
    lora: str | None = None
    finish_reason: str = "length"  # reported once all `output_tokens` are out
    on_output: Callable[[], None] | None = None  # called after each step that gave it a token
    output_token_ids: list[int] | None = None  # known up front: output blocks are cached too (else only prompt)
    lora_id: int | None = None  # the adapter's id in KV events (vLLM's lora_int_id)
    report_cached_blocks: bool = False  # vLLM's kv_cache_report_mode "full": BlockStored for prefix hits too
    # --- set by the engine ---
    state: RequestState = RequestState.WAITING
    arrival: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    num_generated: int = 0
    num_cached_tokens: int = 0
    num_computed_tokens: int = 0  # prompt tokens in the KV cache (hits + prefilled chunks)
    step_tokens: int = 0  # prompt tokens being computed in the current step
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of its full blocks so far (prompt, then output)
    num_registered: int = 0  # leading blocks findable in the prefix cache (hits, then those it cached)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def done(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED)


class EngineObserver(Protocol):
    """Receives per-request timing events (the Prometheus histograms implement this)."""

    def on_scheduled(self, req: SimRequest) -> None: ...
    def on_token(self, req: SimRequest, now: float) -> None: ...
    def on_finished(self, req: SimRequest) -> None: ...


@dataclass
class EngineStats:
    """Monotonic counters, exported as vLLM's `*_total` metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which were cached
    lora_loads: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finished_reason -> count


def step_duration_s(cfg: SimConfig, batch: int, prefill_tokens: int, lora_loads: int) -> float:
    """Wall time of one engine step (the documented formula; see the module docstring)."""
    decode_ms = cfg.decode_ms_per_token * (1.0 + cfg.decode_batch_factor * max(batch - 1, 0))
    ms = decode_ms + cfg.prefill_ms_per_token * prefill_tokens + cfg.lora_load_ms * lora_loads
    return ms / 1000.0


class Engine:
    """Scheduler state of one simulated server; call `begin_step` then `end_step` alternately."""

    def __init__(self, cfg: SimConfig, observer: EngineObserver | None = None) -> None:
        self.cfg = cfg
        self.observer = observer
        # KV events of the step in progress (None when they are off: no cost at all)
        self._events: list[KVEvent] | None = [] if cfg.kv_events.publishing else None
        self.pool = BlockPool(cfg.num_gpu_blocks, self._events)
        self.stats = EngineStats()
        self.waiting: dict[SimRequest, None] = {}  # insertion-ordered: FIFO with O(1) removal
        self.running: dict[SimRequest, None] = {}
        self._lora_running: dict[str, int] = {}  # adapter -> running requests using it
        self._lora_slots: OrderedDict[str, None] = OrderedDict()  # resident adapters, LRU first
        self._batch: list[SimRequest] | None = None  # requests of the step in flight

    # ----- requests -----
    def add_request(self, req: SimRequest, now: float) -> None:
        if req.output_tokens < 1:
            raise ValueError("a request must generate at least one token")
        need = self._blocks_needed(req)
        if need > self.cfg.num_gpu_blocks:
            raise ValueError(f"request needs {need} KV blocks; the pool has {self.cfg.num_gpu_blocks}")
        req.state = RequestState.WAITING
        req.arrival = now
        req.hashes = block_hashes(req.prompt_token_ids, self.cfg.block_size, self._root(req))
        self.waiting[req] = None

    def abort_request(self, req: SimRequest, now: float, reason: str = "abort") -> None:
        """Drop a request wherever it is; its batch slot and KV blocks are free at once.
        `reason` is its finished_reason in the metrics ("abort", or "error" for an injected failure)."""
        if req in self.waiting:
            del self.waiting[req]
        elif req in self.running:
            self._finish(req, now, reason)
            return
        else:
            return
        req.state = RequestState.ABORTED
        req.finished_at = now
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's reset_prefix_cache: forget every cached block. Refused (False) while requests hold
        blocks, unless `reset_running_requests` (vLLM then preempts and recomputes them; here they keep
        running and store their blocks again, without the recompute time)."""
        if not self.pool.reset(force=reset_running_requests):
            return False
        for req in self.running:
            req.num_registered = 0
        if self._events is not None:
            self._events.append(AllBlocksCleared())
        return True

    def take_kv_events(self) -> list[KVEvent]:
        """The KV events since the last call (one batch a step), oldest first."""
        events = self._events
        if not events:
            return []
        out = events.copy()
        events.clear()
        return out

    def forget_lora(self, name: str) -> None:
        """An adapter was unloaded: it no longer occupies a GPU slot."""
        self._lora_slots.pop(name, None)

    # ----- steps -----
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def begin_step(self, now: float) -> float | None:
        """Pick the step's work within the token budget; returns its duration in seconds (None: idle)."""
        if self._batch is not None:
            raise RuntimeError("begin_step called twice without end_step")
        budget = self.cfg.max_num_batched_tokens
        batch: list[SimRequest] = []
        prefill = 0
        for req in self.running:
            if budget <= 0:
                break
            left = req.prompt_len - req.num_computed_tokens
            req.step_tokens = min(left, budget)
            budget -= req.step_tokens if left > 0 else 1
            prefill += req.step_tokens
            batch.append(req)
        admitted = self._admit(now, budget)
        for req in admitted:
            prefill += req.step_tokens
        batch += admitted
        if not batch:
            return None
        loads = self._load_adapters(admitted)
        self._batch = batch
        return step_duration_s(self.cfg, len(batch), prefill, loads)

    def end_step(self, now: float) -> list[SimRequest]:
        """Apply the step: prefill chunks land, decoding requests get a token; returns those that got one."""
        batch, self._batch = self._batch or [], None
        out: list[SimRequest] = []
        bs = self.cfg.block_size
        for req in batch:
            if req.state is not RequestState.RUNNING:
                continue  # aborted while the step ran
            if req.step_tokens:
                req.num_computed_tokens += req.step_tokens
                req.step_tokens = 0
                if req.num_computed_tokens < req.prompt_len:
                    if req.num_computed_tokens // bs > req.num_registered:
                        self._cache_blocks(req)  # a prefill chunk completed blocks
                    continue  # prefill goes on in the next step
            if req.num_generated == 0:
                req.first_token_at = now
            req.num_generated += 1
            # blocks whose KV is complete: the prompt and all output tokens but the one just sampled
            if (req.num_computed_tokens + req.num_generated - 1) // bs > req.num_registered:
                self._cache_blocks(req)
            self.stats.generation_tokens += 1
            if self.observer is not None:
                self.observer.on_token(req, now)
            req.last_token_at = now
            if req.num_generated >= req.output_tokens:
                self._finish(req, now, req.finish_reason)
            out.append(req)
        for req in out:
            if req.on_output is not None:
                req.on_output()
        return out

    # ----- views for metrics -----
    def kv_usage(self) -> float:
        return self.pool.usage()

    def running_adapters(self) -> list[str]:
        return sorted(self._lora_running)

    def waiting_adapters(self) -> list[str]:
        return sorted({r.lora for r in self.waiting if r.lora is not None})

    # ----- internals -----
    def _root(self, req: SimRequest) -> int:
        return root_hash(self.cfg.kv_hash_seed, req.lora)

    def _cache_blocks(self, req: SimRequest) -> None:
        """Make the request's newly completed full blocks findable; with events on, one BlockStored."""
        bs = self.cfg.block_size
        kv_tokens = req.num_computed_tokens + max(req.num_generated - 1, 0)
        upto = min(kv_tokens // bs, len(req.blocks))
        first = req.num_registered
        tokens = req.prompt_token_ids
        if upto > len(req.hashes):
            if req.output_token_ids is None:
                upto = len(req.hashes)  # output ids unknown: only prompt blocks are cached
            else:
                tokens = tokens + req.output_token_ids
                extend_hashes(req.hashes, tokens, bs, self._root(req), upto)
        if upto <= first:
            return
        register, blocks, hashes = self.pool.register, req.blocks, req.hashes
        for b in range(first, upto):
            register(blocks[b], hashes[b])
        req.num_registered = upto
        if self._events is not None:
            if len(tokens) < upto * bs:
                tokens = tokens + (req.output_token_ids or [])
            self._events.append(self._stored(req, first, upto, tokens))

    def _stored(self, req: SimRequest, first: int, upto: int, tokens: list[int]) -> BlockStored:
        bs, n = self.cfg.block_size, upto - first
        return BlockStored(
            block_hashes=req.hashes[first:upto],
            parent_block_hash=req.hashes[first - 1] if first else None,
            token_ids=tokens[first * bs : upto * bs],
            block_size=bs,
            lora_id=req.lora_id,
            medium=MEDIUM_GPU,
            lora_name=req.lora,
            extra_keys=[(req.lora,)] * n if req.lora is not None else [None] * n,
            group_idx=0,
            kv_cache_spec_kind=SPEC_KIND_FULL_ATTENTION,
        )

    def _blocks_needed(self, req: SimRequest) -> int:
        return math.ceil((req.prompt_len + req.output_tokens) / self.cfg.block_size)

    def _admit(self, now: float, budget: int) -> list[SimRequest]:
        admitted: list[SimRequest] = []
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            lora = req.lora
            if lora is not None and lora not in self._lora_running and len(self._lora_running) >= self.cfg.max_loras:
                continue  # waits for a LoRA slot; later requests may still go
            hits = self.pool.lookup(req.hashes)
            if hits and len(hits) * self.cfg.block_size >= req.prompt_len:
                hits = hits[:-1]  # at least one prompt token is always computed
            new_blocks = self._blocks_needed(req) - len(hits)
            if new_blocks > self.pool.num_available - self.pool.evictable_among(hits):
                break  # KV pool full: head-of-line waits for blocks to be released
            self.pool.acquire(hits)
            req.blocks = hits + self.pool.allocate(new_blocks)
            req.num_registered = len(hits)
            req.num_cached_tokens = req.num_computed_tokens = len(hits) * self.cfg.block_size
            if hits and req.report_cached_blocks and self._events is not None:
                self._events.append(self._stored(req, 0, len(hits), req.prompt_token_ids))
            req.step_tokens = min(req.prompt_len - req.num_computed_tokens, budget)
            budget -= req.step_tokens
            req.state = RequestState.RUNNING
            req.scheduled_at = now
            del self.waiting[req]
            self.running[req] = None
            if lora is not None:
                self._lora_running[lora] = self._lora_running.get(lora, 0) + 1
            self.stats.prompt_tokens += req.prompt_len
            self.stats.prefix_queries += req.prompt_len
            self.stats.prefix_hits += req.num_cached_tokens
            if self.observer is not None:
                self.observer.on_scheduled(req)
            admitted.append(req)
        return admitted

    def _load_adapters(self, admitted: list[SimRequest]) -> int:
        loads = 0
        for req in admitted:
            lora = req.lora
            if lora is None:
                continue
            if lora in self._lora_slots:
                self._lora_slots.move_to_end(lora)
                continue
            loads += 1
            self._lora_slots[lora] = None
            if len(self._lora_slots) > self.cfg.max_loras:
                for name in self._lora_slots:  # evict the least recently used idle adapter
                    if name not in self._lora_running:
                        del self._lora_slots[name]
                        break
        self.stats.lora_loads += loads
        return loads

    def _finish(self, req: SimRequest, now: float, reason: str) -> None:
        del self.running[req]
        self.pool.release(req.blocks)
        req.blocks = []
        if req.lora is not None:
            left = self._lora_running[req.lora] - 1
            if left:
                self._lora_running[req.lora] = left
            else:
                del self._lora_running[req.lora]
        req.state = RequestState.ABORTED if reason in ("abort", "error") else RequestState.FINISHED
        req.finished_at = now
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if self.observer is not None:
            self.observer.on_finished(req)
