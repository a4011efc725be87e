"""The stack file: which workers `switchyard up` starts (or only routes to) and how the gateway runs.

```yaml
gateway: {host: 127.0.0.1, port: 8000, settings: {model_refresh_interval: 2}}
workers:
  - name: chat
    model: "{models}/smollm2-135m-instruct"   # {models}: the demo models directory
    served_model_names: [smollm2]
    loras: {lora-a: "{models}/lora-a"}
    port: 8001
    api_key_env: CHAT_KEY                     # this worker requires the key held in $CHAT_KEY
    kv_events_port: 5557                      # optional: KV cache events on fixed ports (default: free ones)
    kv_replay_port: 5558
  - name: embed
    model: "{models}/all-minilm-l6-v2"
    port: 8002
    kv_events: false                          # no prefix caching, so no KV events (embedding models)
  - name: elsewhere
    url: http://10.0.0.7:8000                 # already running: routed to, not started
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.models import ADAPTERS, DemoModels

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StackFileError(ValueError):
    """The stack file is unreadable or invalid; the message names the file and the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Extra gateway configuration keys, merged into its config file."
    )


class WorkerSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str | None = Field(default=None, description="An already-running server: routed to, never started.")
    model: str | None = Field(default=None, description="Model directory or Hugging Face id to serve.")
    served_model_names: list[str] = Field(default_factory=list)
    loras: dict[str, str] = Field(default_factory=dict, description="Adapter name -> adapter directory.")
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    max_model_len: int | None = Field(default=None, gt=0)
    runtime_lora: bool = False
    args: list[str] = Field(default_factory=list, description="Extra vLLM arguments, passed unchanged.")
    sim_args: list[str] = Field(default_factory=list, description="Extra simulator arguments (with --sim).")
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout: float = Field(default=900.0, gt=0)
    kv_events: bool = Field(
        default=True,
        description="vLLM's KV cache events over ZMQ, with prefix caching (for KV-aware routing); off for models "
        "without prefix caching, such as encoder-only embedding models.",
    )
    kv_events_port: int | None = Field(default=None, ge=1, le=65535, description="Default: a free port.")
    kv_replay_port: int | None = Field(default=None, ge=1, le=65535, description="Default: a free port.")
    api_key_env: str | None = Field(
        default=None,
        pattern=ENV_NAME,
        description="Environment variable holding the API key this worker requires: a started worker gets it as "
        "VLLM_API_KEY (never on its command line), the gateway sends it as the backend's key.",
    )

    @model_validator(mode="after")
    def _started_or_external(self) -> WorkerSpec:
        if self.url is None and (self.model is None or self.port is None):
            raise ValueError("a worker needs either `url` (already running) or both `model` and `port`")
        if self.url is not None and self.model is not None:
            raise ValueError("give either `url` or `model`, not both")
        return self

    @property
    def base_url(self) -> str:
        if self.url is not None:
            return self.url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def names(self) -> list[str]:
        """Every model name this worker should serve (its served names, else the model, plus adapters)."""
        base = self.served_model_names or ([self.model] if self.model else [])
        return [*base, *self.loras]


class StackSpec(_Strict):
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    workers: list[WorkerSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> StackSpec:
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique: {names}")
        local = [w for w in self.workers if w.url is None]
        kv = [p for w in local if w.kv_events for p in (w.kv_events_port, w.kv_replay_port) if p is not None]
        ports = [w.port for w in local] + [self.gateway.port] + kv
        if len(set(ports)) != len(ports):
            raise ValueError(f"ports must be unique (workers, gateway and KV events): {ports}")
        return self


def _expand(value: Any, models: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{models}", str(models))
    if isinstance(value, list):
        return [_expand(v, models) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, models) for k, v in value.items()}
    return value


def parse_stack(data: Any, models: Path, source: str = "stack file") -> StackSpec:
    """A parsed YAML document -> StackSpec, with {models} expanded; StackFileError names the bad key."""
    if not isinstance(data, dict):
        raise StackFileError(f"{source}: expected a mapping with `workers:`")
    try:
        return StackSpec.model_validate(_expand(data, models))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise StackFileError(f"{source}: {problems}") from None


def load_stack(path: Path, models: Path) -> StackSpec:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise StackFileError(f"cannot read stack file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise StackFileError(f"{path}: invalid YAML: {exc}") from None
    return parse_stack(data, models, str(path))


def demo_stack(models: Path, gateway_port: int = 8000, runtime_lora: bool = False) -> StackSpec:
    """The README's stack: the chat model with both adapters on one worker, the embedding model on another."""
    demo = DemoModels(models)
    chat = WorkerSpec(
        name="chat",
        model=str(demo.chat),
        served_model_names=["smollm2"],
        loras={a.name: str(demo.adapter(a.name)) for a in ADAPTERS},
        port=gateway_port + 1,
        max_model_len=2048,
        runtime_lora=runtime_lora,
        # Without a tool-call parser vLLM answers any request carrying `tools` (tool_choice auto) with a 400.
        args=["--max-lora-rank", "8", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
    )
    # vLLM 0.32 cannot cache the prefixes of this encoder-only model: with --enable-prefix-caching its engine
    # fails to start ("HybridKVCacheCoordinator requires at least one cacheable group"), so no KV events.
    embed = WorkerSpec(
        name="embed", model=str(demo.embed), served_model_names=["minilm"], port=gateway_port + 2, kv_events=False
    )
    return StackSpec(gateway=GatewaySpec(port=gateway_port), workers=[chat, embed])
