"""Settings for routing policies, engine-metric scraping and admission control."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from gateway.settings_base import StrictModel

PolicyName = Literal[
    "affinity", "prefix_affinity", "session", "lora_affinity", "least_load", "least_inflight", "round_robin", "random"
]


class LoadWeights(StrictModel):
    """Weights of the least-load score: weight * signal, summed; the lowest score wins."""

    queue: float = Field(default=2.0, ge=0, description="Per request waiting in the engine's queue (scraped).")
    kv: float = Field(default=2.0, ge=0, description="Times KV-cache usage, 0..1 (scraped).")
    inflight: float = Field(
        default=1.0, ge=0, description="Per request this gateway has open on the backend (exact, at pick time)."
    )
    running: float = Field(default=0.0, ge=0, description="Per request in the engine's running batch (scraped).")


class RoutingSettings(StrictModel):
    policy: PolicyName = Field(
        default="affinity",
        description="Policy for models not listed in `models`. `affinity` combines the others: a LoRA "
        "adapter stays on the backends running it (else its home backends), other requests stick to their "
        "session (X-Session-ID or `user`) or else their prompt's leading blocks, and an overloaded preferred "
        "backend is left for the next one in rendezvous order; requests with no key go by least_load.",
    )
    models: dict[str, PolicyName] = Field(default_factory=dict, description="Policy per model name.")
    scrape_interval: float = Field(default=0.1, gt=0, description="Seconds between scrapes of each backend's /metrics.")
    scrape_timeout: float = Field(default=0.5, gt=0, description="Timeout of one /metrics scrape.")
    scrape_concurrency: int = Field(default=32, gt=0, description="Scrapes in flight at most.")
    stale_after: float = Field(default=1.0, gt=0, description="A scrape older than this counts as unknown load.")
    weights: LoadWeights = Field(default_factory=LoadWeights)
    prefix_chars: int = Field(
        default=256, ge=16, description="Leading characters of the rendered prompt that form the affinity key."
    )
    prefix_block_chars: int = Field(default=64, ge=8, description="Characters per hashed prefix block.")
    load_factor: float = Field(
        default=1.5,
        ge=1.0,
        description="Bounded load: leave the preferred backend when its in-flight count exceeds this factor "
        "times the mean over the model's backends plus `load_slack`.",
    )
    load_slack: float = Field(
        default=4.0, ge=0, description="In-flight requests a preferred backend may carry above the bound."
    )
    spill_margin: float = Field(
        default=0.0,
        ge=0,
        description="Two choices for prefix keys: the key's second backend (by rendezvous) takes the request "
        "when the first has more than this many in-flight requests above it. Both keep the prefix cached, "
        "and unique prompts spread evenly.",
    )
    session_spill_margin: float = Field(
        default=2.0,
        ge=0,
        description="The same for session keys; larger, since a conversation's history is cached only where "
        "its previous turn ran.",
    )
    queue_threshold: float = Field(
        default=4.0, ge=0, description="Bounded load: leave the preferred backend when its engine queue exceeds this."
    )
    tie_ratio: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Predicted times to first token within this fraction of the best one are ties, decided by load: "
        "the per-engine rates behind them are measured, so identical engines differ by noise.",
    )
    lora_backends: int = Field(
        default=1, ge=1, description="Backends an adapter is kept on before it spills to others under load."
    )
    session_header: str = Field(default="x-session-id", description="Header that carries a session key.")
    prefix_mode: Literal["auto", "precise", "approximate"] = Field(
        default="auto",
        description="How `affinity` predicts the prompt tokens each backend has cached: `precise` from the "
        "engines' KV cache events (where a backend's events are lost or missing, from the gateway's own record), "
        "`approximate` from the prompt blocks this gateway sent to each backend only; `auto` is precise "
        "wherever events are known.",
    )
    approximate_block_chars: int = Field(
        default=128, ge=16, description="Characters per block of the approximate prefix index."
    )
    approximate_capacity_blocks: int = Field(
        default=262_144,
        ge=1,
        description="Blocks the approximate index keeps per backend when its engine does not report its KV "
        "cache size (vllm:cache_config_info); otherwise it keeps what that cache holds.",
    )
    tokenize_timeout: float = Field(
        default=0.25,
        gt=0,
        description="Longest wait for a backend's POST /tokenize (precise mode, long prompts only); slower "
        "answers route the request by the approximate index instead.",
    )
    prior_prefill_seconds_per_token: float = Field(
        default=0.0002,
        gt=0,
        description="Prefill cost assumed until the engines' own (learned from their metrics) is known.",
    )

    @model_validator(mode="after")
    def _check_staleness(self) -> RoutingSettings:
        if self.stale_after <= self.scrape_interval:
            raise ValueError(
                f"stale_after ({self.stale_after:g} s) must be longer than scrape_interval"
                f" ({self.scrape_interval:g} s): every scrape would count as stale"
            )
        return self


class AdmissionSettings(StrictModel):
    max_inflight: int | None = Field(default=None, gt=0, description="Gateway-wide in-flight limit (none: unlimited).")
    max_inflight_per_model: int | None = Field(
        default=None, gt=0, description="In-flight limit of each model (none: unlimited)."
    )
    models: dict[str, PositiveInt] = Field(default_factory=dict, description="In-flight limit for particular models.")
    queue_size: int = Field(default=1000, ge=0, description="Requests that may wait for a slot, gateway-wide.")
    queue_timeout: float = Field(default=30.0, gt=0, description="Longest wait for a slot before a 429.")
    saturation: float | None = Field(
        default=1.0,
        gt=0,
        description="Pool saturation (max(queue/queue_norm, kv/kv_norm) of the model's least loaded backend) at "
        "which new requests queue at the gateway instead of going upstream (none: ignore engine signals).",
    )
    stale_after: float = Field(default=1.0, gt=0, description="Scrapes older than this say nothing of saturation.")
    queue_norm: float = Field(default=5.0, gt=0, description="Engine queue length counted as saturated.")
    kv_norm: float = Field(default=0.8, gt=0, description="KV-cache usage counted as saturated.")
    low_priority_queue_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Low-priority requests are rejected once the wait queue is this full (they shed first).",
    )
    priority_header: str = Field(default="x-switchyard-priority", description="Header carrying high|normal|low.")
    retry_after: int = Field(default=1, ge=0, description="Retry-After seconds sent with a 429.")
