"""`SimConfig`: every knob of one simulated vLLM server, with defaults and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from worker.sim.errors import ConfigError
from worker.sim.kv_events import KVEventsSettings
from worker.sim.text import MAX_POSITIONS

__all__ = ["ConfigError", "SimConfig"]


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulated server. Times are in milliseconds, as on the command line.

    The defaults resemble a small (~1B) model on one GPU: prefill is cheap per token, decode
    costs ~15 ms per step at batch 1 and grows with the batch (see `engine.step_duration_s`).
    """

    served_model_name: str = "sim-model"
    model: str | None = None  # `root` of the base model card; defaults to the served name
    loras: dict[str, str] = field(default_factory=dict)  # adapter name -> path (card `root`)
    max_loras: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one engine step (chunked prefill)
    num_gpu_blocks: int = 8192
    block_size: int = 16
    max_model_len: int = 2048
    prefill_ms_per_token: float = 0.15
    decode_ms_per_token: float = 15.0
    decode_batch_factor: float = 0.01
    lora_load_ms: float = 20.0
    embedding_dim: int = 384
    api_key: str | None = None
    allow_runtime_lora: bool = False
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    # KV cache events and prefix-cache reporting, as vLLM's --kv-events-config / --enable-prompt-tokens-details
    kv_events: KVEventsSettings = field(default_factory=KVEventsSettings)
    kv_hash_seed: int = 0  # changes every block hash (the NONE_HASH seed of vLLM's hash chain)
    enable_prompt_tokens_details: bool = False
    server_dev_mode: bool = False  # POST /reset_prefix_cache, as vLLM's VLLM_SERVER_DEV_MODE=1
    # answer token i is the number i (its position in the whole answer, continuations included)
    positional_output: bool = False
    # fault injection
    fail_rate: float = 0.0
    fail_status: int = 500
    stall_after_tokens: int | None = None
    drop_after_tokens: int | None = None
    exit_after_requests: int | None = None
    exit_after_tokens: int | None = None  # the whole process exits once a request has streamed N tokens
    error_after_tokens: int | None = None  # vLLM's mid-stream error event after N tokens
    slow_start_s: float = 0.0

    def __post_init__(self) -> None:
        self._check_positive(
            "max_loras",
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_gpu_blocks",
            "block_size",
            "max_model_len",
            "embedding_dim",
        )
        self._check_non_negative(
            "prefill_ms_per_token", "decode_ms_per_token", "decode_batch_factor", "lora_load_ms", "slow_start_s"
        )
        if not self.served_model_name:
            raise ConfigError("served_model_name must not be empty")
        if self.served_model_name in self.loras:
            raise ConfigError(f"LoRA name {self.served_model_name!r} clashes with the served model name")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ConfigError(f"fail_rate must be within [0, 1], got {self.fail_rate}")
        if not 400 <= self.fail_status <= 599:
            raise ConfigError(f"fail_status must be an HTTP error status (400-599), got {self.fail_status}")
        for name in ("stall_after_tokens", "drop_after_tokens", "exit_after_requests", "exit_after_tokens",
                     "error_after_tokens"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within [0, 65535], got {self.port}")
        if self.num_gpu_blocks * self.block_size < self.max_model_len:
            raise ConfigError(
                f"num_gpu_blocks * block_size ({self.num_gpu_blocks * self.block_size} tokens) must hold at "
                f"least one max_model_len ({self.max_model_len}) request"
            )

        if self.positional_output and self.max_model_len > MAX_POSITIONS:
            raise ConfigError(
                f"positional_output numbers tokens up to {MAX_POSITIONS - 1}: max_model_len must be <= "
                f"{MAX_POSITIONS}, got {self.max_model_len}"
            )

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def _check_non_negative(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def model_root(self) -> str:
        return self.model or self.served_model_name

    def replace(self, **changes: object) -> SimConfig:
        """A copy with some fields changed (used by `--count` to give each server its port)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
