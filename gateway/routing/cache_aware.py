"""The default policy (`affinity`): the backend where the request's first token comes soonest.

For each candidate it predicts the prompt tokens already cached there, from the engine's own KV events
(kv_index.py, exact, with the blocks of the requests this gateway routed there and the engine has not announced
yet) or else from the prompt blocks this gateway sent there (approximate_index.py), and turns them into a
predicted time to first token (cost_model.py). Overloaded candidates (bounded load: in-flight
above `load_factor` x the mean + `load_slack`, or a long engine queue) are passed over while others remain.

Costs closer than one block's prefill, or than `tie_ratio` of the best (the engine rates behind them are
measured: identical engines differ by noise), are ties. Where some tied candidates hold all but `tie_ratio` of
the prompt, ties go to those (the fewest tokens to compute, within a block): a near-whole hit behind another
request's prefill costs this request about what a miss on an idle backend does, but the miss spends a whole
prefill there, delays what queues behind it and evicts other prefixes. (A smaller hit, such as a short shared
system prompt before a new question, does not decide: the running batch a backend carries, which the predicted
TTFT does not see, does.) Then ties go to the candidates with the fewest requests in flight (so unique prompts
spread as evenly as least-load spreads them), then by rendezvous order of the request's
anchor (its session, else its first prompt block past the longest prefix any candidate holds): among equally
busy backends, a prefix nobody holds yet goes to the same one from every gateway replica fed by the same
events, and a system prompt every backend holds does not send all its requests the same way. LoRA adapters
keep their own placement (policies.Affinity): an adapter's slot matters more than its prefix.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.fleet.registry import Backend, fresh_sample
from gateway.routing.approximate_index import ApproximateIndex
from gateway.routing.cost_model import CostModel
from gateway.routing.kv_index import CacheState, KvIndex
from gateway.routing.policies import Affinity, LeastLoad, is_adapter
from gateway.routing.prefix_hash import name_key, rendezvous_score, session_key, url_hash
from gateway.routing.prompt import PromptView, prompt_view
from gateway.routing.request import RequestInfo
from gateway.routing.settings import RoutingSettings


class PrefixCaches:
    """Both prefix indexes and what converts between their units, shared by the router and the policy."""

    def __init__(self, settings: RoutingSettings, kv: KvIndex) -> None:
        self.kv = kv
        self.approximate = ApproximateIndex(settings.approximate_capacity_blocks)
        self.mode = settings.prefix_mode
        self.block_chars = settings.approximate_block_chars
        self.chars_per_token: dict[str, float] = {}  # per model, learned from usage

    def chars_per_token_of(self, model: str) -> float:
        return self.chars_per_token.get(model, 4.0)

    def learn_chars_per_token(self, model: str, chars: int, tokens: int) -> None:
        if tokens <= 0 or chars <= 0:
            return
        old = self.chars_per_token.get(model)
        value = chars / tokens
        self.chars_per_token[model] = value if old is None else old + 0.1 * (value - old)

    def refresh(self, backends: Sequence[Backend]) -> None:
        """Keep the approximate index to the fleet: each backend's capacity from its KV cache, departed ones out."""
        present = set()
        for backend in backends:
            present.add(backend.url)
            sample = backend.engine
            if sample is not None and sample.num_blocks and sample.block_size:
                tokens = sample.num_blocks * sample.block_size
                model = next(iter(backend.models), "")
                chars = tokens * self.chars_per_token_of(model)
                self.approximate.set_capacity(backend.url, int(chars // self.block_chars))
        for url in self.approximate.urls():
            if url not in present:
                self.approximate.forget(url)

    def routed(self, view: PromptView, url: str, keys: list[int], now: float) -> None:
        """The prompt's blocks go to this backend: on their way there until its events announce them."""
        self.settled(view, now)  # a retry: the attempt before it is over
        self.kv.routed(url, keys)
        view.routed = (url, keys)

    def settled(self, view: PromptView, now: float) -> None:
        """The request's prefill is over (first token, or the attempt ended)."""
        routed = view.routed
        if routed is not None:
            view.routed = None
            self.kv.settled(routed[0], routed[1], now)

    def holds_no_block(self, request: RequestInfo) -> bool:
        """The request's whole body is shorter than one block: no prompt in it can match any cache."""
        return 0 < request.size < self.block_chars

    def precise_block_size(self, urls: Sequence[str]) -> int | None:
        """The engines' block size when the precise index may be used for these backends."""
        if self.mode == "approximate":
            return None
        return self.kv.block_size(urls)


class CacheAware:
    def __init__(self, settings: RoutingSettings, caches: PrefixCaches, cost: CostModel, affinity: Affinity) -> None:
        self._caches = caches
        self._cost = cost
        self._affinity = affinity  # adapters, and the bounded-load rule
        self._least = LeastLoad(settings)
        self._session_header = settings.session_header.lower()
        self._factor = settings.load_factor
        self._slack = settings.load_slack
        self._queue_threshold = settings.queue_threshold
        self._tie_ratio = settings.tie_ratio
        self._stale_after = settings.stale_after
        self._url_hashes: dict[str, int] = {}

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        if is_adapter(candidates[0], request.model) and len(candidates) > 1:
            return self._affinity.pick(candidates, request)
        caches = self._caches
        view = request.prompt
        if view is None and not caches.holds_no_block(request):
            view = prompt_view(request.payload, None)
        char_keys = [] if view is None else view.char_keys(caches.block_chars)
        if view is None or (not char_keys and view.token_ids is None):
            # Not one whole block: nothing any cache could hold. Sessions and load decide, at no extra cost.
            return candidates[0] if len(candidates) == 1 else self._affinity.pick(candidates, request)
        now = time.monotonic()
        model = request.model
        cpt = caches.chars_per_token_of(model)
        urls = [backend.url for backend in candidates]
        cached, prompt_tokens, block_tokens, keys, precise = self._cached_tokens(view, urls, cpt, now)
        view.predicted = dict(zip(urls, cached, strict=True))
        if len(candidates) == 1:
            caches.approximate.record(urls[0], char_keys)
            return candidates[0]
        stale_after = self._stale_after
        samples = [fresh_sample(backend, now, stale_after) for backend in candidates]
        rate = self._cost.prefill_rate(candidates)
        uncached = [prompt_tokens - c if c < prompt_tokens else 0.0 for c in cached]
        costs = self._cost.ttft(candidates, uncached, samples, rate)
        inflight = [backend.inflight for backend in candidates]
        limit = self._factor * sum(inflight) / len(candidates) + self._slack
        threshold = self._queue_threshold
        allowed = [
            i
            for i, sample in enumerate(samples)
            if inflight[i] < limit and (sample is None or sample.waiting <= threshold)  # not overloaded
        ]
        if not allowed:
            allowed = list(range(len(candidates)))
        best = min(costs[i] for i in allowed)
        tolerance = max(rate * block_tokens, self._tie_ratio * best)
        tied = [i for i in allowed if costs[i] - best <= tolerance]
        if len(tied) > 1:  # a near-whole hit first, then fewest requests in flight, then rendezvous order
            least = min(uncached[i] for i in tied)
            if least <= self._tie_ratio * prompt_tokens:
                tied = [i for i in tied if uncached[i] < least + block_tokens]
            fewest = min(inflight[i] for i in tied)
            tied = [i for i in tied if inflight[i] == fewest]
        anchor = self._anchor(request, view, keys, int(max(cached) / block_tokens + 1e-6))
        choice = max(tied, key=lambda i: rendezvous_score(anchor, self._url_hash(urls[i])))
        caches.approximate.record(urls[choice], char_keys)
        if precise:  # the prompt's blocks are on their way there, until the engine announces them
            caches.routed(view, urls[choice], keys, now)
        return candidates[choice]

    def _cached_tokens(
        self, view: PromptView, urls: list[str], cpt: float, now: float
    ) -> tuple[list[float], float, float, list[int], bool]:
        """(predicted cached tokens per backend, the prompt's tokens, tokens per block, the prompt's block keys
        in the index that counted them, whether that index was the precise one) for this prompt."""
        caches = self._caches
        block_chars = caches.block_chars
        char_keys = view.char_keys(block_chars)
        approx_blocks = caches.approximate.match(char_keys, urls)
        prompt_tokens = float(len(view.token_ids)) if view.token_ids is not None else len(view.text) / cpt
        most = max(prompt_tokens - 1.0, 0.0)  # the engine always computes the prompt's last token
        approx = [c if (c := blocks * block_chars / cpt) < most else most for blocks in approx_blocks]
        block_size = caches.precise_block_size(urls)
        if block_size is None or view.token_ids is None:
            return approx, prompt_tokens, block_chars / cpt, char_keys, False
        cap = (len(view.token_ids) - 1) // block_size  # whole blocks the engine may reuse
        token_keys = view.token_keys(block_size)
        precise = caches.kv.match_routed(token_keys, urls, now)
        cached: list[float] = []
        for url, blocks, guess in zip(urls, precise, approx, strict=True):
            exact = float(min(blocks, cap) * block_size)
            state = caches.kv.state(url)
            if state is CacheState.LIVE:
                cached.append(exact)
            elif state is CacheState.REBUILDING:
                cached.append(max(exact, guess))  # what events show is held, and the gateway's guess
            else:
                cached.append(guess)
        return cached, prompt_tokens, float(block_size), token_keys, True

    def _anchor(self, request: RequestInfo, view: PromptView, keys: list[int], held: int) -> int:
        """What ties are broken by: the session, else the prompt's first block past the longest prefix any
        candidate holds. A prefix nobody holds yet goes the same way from every replica (its first block), while
        a part every backend holds (a shared system prompt) says nothing: what follows it decides."""
        key = session_key(request.model, request.payload, request.headers, self._session_header)
        if key is not None:
            return key
        if keys:
            return keys[min(held, len(keys) - 1)]
        return name_key(view.text[:256].decode("utf-8", "replace"))

    def _url_hash(self, url: str) -> int:
        value = self._url_hashes.get(url)
        if value is None:
            if len(self._url_hashes) > 4096:
                self._url_hashes.clear()
            value = self._url_hashes[url] = url_hash(url)
        return value
