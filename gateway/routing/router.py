"""The proxy's picker: the configured policy's choice, counted in flight on the chosen backend in the same step.

Before the first pick of a request (`prepare`), for the models routed by the prefix indexes, it reads the
prompt off the payload and, when the engines publish KV events and the prompt spans a few of their blocks,
asks a backend for its exact token ids. The pick then leaves on the request's prompt view the cached tokens
predicted on the chosen backend, and charges its other prompt tokens to that backend's pending prefill until
the first token comes (`discharge`); then too the prompt's blocks the precise index counted on their way to that
backend begin to settle (kv_index.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.fleet.registry import Backend, Registry
from gateway.routing.cache_aware import PrefixCaches
from gateway.routing.policies import Policy, is_adapter
from gateway.routing.policy_names import uses_prefix_caches
from gateway.routing.prompt import PromptView, prompt_view
from gateway.routing.request import RequestInfo
from gateway.routing.settings import RoutingSettings
from gateway.routing.tokenizer import Tokenizer, tokenize_body

MIN_BLOCKS = 2  # a prompt shorter than this many engine blocks is not worth a /tokenize round trip


class Router:
    def __init__(
        self,
        policy: Policy,
        registry: Registry,
        settings: RoutingSettings,
        caches: PrefixCaches | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self._policy = policy
        self._registry = registry
        self._settings = settings
        self._caches = caches
        self._tokenizer = tokenizer

    async def prepare(self, request: RequestInfo, candidates: Sequence[Backend]) -> RequestInfo:
        caches = self._caches
        if caches is None or request.payload is None or not uses_prefix_caches(self._settings, request.model):
            return request
        if caches.holds_no_block(request):
            return request
        lora = request.model if is_adapter(candidates[0], request.model) else None
        view = prompt_view(request.payload, lora)
        if view is None:
            return request
        tokenizer = self._tokenizer
        if view.token_ids is None and tokenizer is not None:
            block_size = caches.precise_block_size([backend.url for backend in candidates])
            cpt = caches.chars_per_token_of(request.model)
            if block_size is not None and len(view.text) >= MIN_BLOCKS * block_size * cpt:
                body = tokenize_body(request.model, request.payload)
                if body is not None:
                    backend = min(candidates, key=_inflight)  # any of them tokenizes alike: the least busy
                    tokens = await tokenizer.tokens(backend.url, backend.api_key, body)
                    if tokens is not None:
                        view.token_ids = tokens
                        caches.learn_chars_per_token(request.model, len(view.text), len(tokens))
        request.prompt = view
        return request

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend:
        backend = self._policy.pick(candidates, request)
        # no await between the pick and the count: bursts spread at once
        self._registry.acquire(backend, request.model if is_adapter(backend, request.model) else None)
        view = request.prompt
        if view is not None and backend.url in view.predicted:
            prompt = self._prompt_size(view, request.model)
            assert prompt is not None  # a prediction comes from the caches
            charge = max(int(prompt - view.predicted[backend.url]), 0)
            view.charge = (backend, charge)
            self._registry.charge_prefill(backend, charge)
        return backend

    def prompt_tokens(self, request: RequestInfo) -> int | None:
        """The prompt's tokens: exact when the prompt was tokenized, else estimated from its length."""
        view = request.prompt
        size = None if view is None else self._prompt_size(view, request.model)
        return None if size is None else int(size)

    def _prompt_size(self, view: PromptView, model: str) -> float | None:
        if view.token_ids is not None:
            return len(view.token_ids)
        caches = self._caches
        return None if caches is None else len(view.text) / caches.chars_per_token_of(model)

    def predicted_cached(self, request: RequestInfo, backend: Backend) -> int | None:
        view = request.prompt
        predicted = None if view is None else view.predicted.get(backend.url)
        return None if predicted is None else round(predicted)

    def discharge(self, request: RequestInfo) -> None:
        """The request's first token came (or its attempt ended): its prefill no longer weighs on the backend."""
        view = request.prompt
        if view is None:
            return
        if view.charge is not None:
            backend, tokens = view.charge
            view.charge = None
            self._registry.charge_prefill(backend, -tokens)
        if view.routed is not None and self._caches is not None:
            self._caches.settled(view, time.monotonic())

    def release(self, backend: Backend, request: RequestInfo) -> None:
        self.discharge(request)
        # counted as an adapter at its pick if it is one now (the backend's cards may have changed since)
        adapter = request.model if request.model in backend.adapters_inflight else None
        self._registry.release(backend, adapter)

    def observe(self, request: RequestInfo, prompt_tokens: int) -> None:
        """The engine's count of the prompt's tokens: teaches the approximate index characters per token."""
        view = request.prompt
        if view is not None and view.token_ids is None and self._caches is not None:
            self._caches.learn_chars_per_token(request.model, len(view.text), prompt_tokens)


def _inflight(backend: Backend) -> int:
    return backend.inflight
