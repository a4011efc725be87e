"""Typed, validated gateway settings: a YAML file, overridden by SWITCHYARD_* environment variables.

Every model forbids unknown keys, so a typo stops the gateway with a message that names the key
instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError
from gateway.routing.settings import AdmissionSettings, RoutingSettings
from gateway.settings_base import StrictModel, UpstreamKeyEnv

ENV_PREFIX = "SWITCHYARD_"


class KvEventEndpoints(StrictModel):
    """Where a backend's engine publishes its KV cache events (vLLM's --kv-events-config), when the backend's own
    GET /kv_event_sources should not be asked (a proxy in between, or another address to reach it by)."""

    endpoint: str = Field(description="ZMQ PUB endpoint, e.g. tcp://10.0.0.5:5557.")
    replay_endpoint: str | None = Field(
        default=None, description="ZMQ ROUTER replay endpoint, e.g. tcp://10.0.0.5:5558."
    )
    topic: str = ""

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise ValueError("must be a ZMQ endpoint: tcp://HOST:PORT (or ipc://PATH)")
        return value


class BackendSettings(UpstreamKeyEnv):
    """One statically configured upstream: a vLLM OpenAI-compatible server."""

    url: str = Field(description="Base URL of the server, e.g. http://10.0.0.5:8000 (no /v1 suffix).")
    kv_events: KvEventEndpoints | None = Field(
        default=None, description="Its KV event endpoints (unset: asked from the backend's GET /kv_event_sources)."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if value.endswith("/v1"):
            raise ValueError("must be the server's base URL, without the /v1 suffix")
        if "@" in value.split("://", 1)[1].split("/", 1)[0]:
            # the URL names the backend in metrics, logs, traces and /admin/fleet: credentials would leak there
            raise ValueError("must not hold credentials (user:password@); give the backend's key with api_key_env")
        return value


class KubernetesSettings(UpstreamKeyEnv):
    """Where to look for workers when `discovery: kubernetes`."""

    namespaces: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["default"], min_length=1)
    label_selector: str = "app.kubernetes.io/part-of=switchyard,app.kubernetes.io/component=worker"
    port_name: str = Field(default="http", description="EndpointSlice port name that carries the vLLM API.")
    kv_events_port_name: str = Field(
        default="kv-events", description="EndpointSlice port name of the workers' KV event publisher (ZMQ PUB)."
    )
    kv_replay_port_name: str = Field(
        default="kv-replay", description="EndpointSlice port name of the workers' KV event replay (ZMQ ROUTER)."
    )
    scheme: Literal["http", "https"] = "http"
    kubeconfig: str | None = Field(
        default=None,
        description="Kubeconfig file to use. Unset: the pod's service account when running in a cluster, "
        "else $KUBECONFIG or ~/.kube/config.",
    )
    context: str | None = Field(default=None, description="Kubeconfig context (unset: its current context).")
    watch_timeout: int = Field(
        default=300, ge=10, description="Seconds one watch request lasts before it is re-opened."
    )
    request_timeout: float = Field(default=30.0, gt=0, description="Timeout of a list call and of a connect.")
    backoff_initial: float = Field(default=0.5, gt=0, description="First retry delay after an API error.")
    backoff_max: float = Field(default=30.0, gt=0, description="Longest retry delay after repeated errors.")


class KvEventSettings(StrictModel):
    """Subscribing to the backends' KV cache events (vLLM's --kv-events-config), for precise prefix routing."""

    enabled: bool = Field(default=True, description="Subscribe to every backend that publishes KV events.")
    timeout: float = Field(default=5.0, gt=0, description="Timeout of GET /kv_event_sources and of one replay.")
    backoff_initial: float = Field(default=0.5, gt=0, description="First retry delay (discovery, reconnects).")
    backoff_max: float = Field(default=30.0, gt=0, description="Longest retry delay.")
    reconcile_interval: float = Field(
        default=1.0, gt=0, description="Seconds between checks for backends to subscribe to or leave."
    )
    receive_hwm: int = Field(default=100_000, gt=0, description="ZMQ high-water mark of each subscription.")
    max_blocks_per_backend: int = Field(
        default=4_000_000,
        gt=0,
        description="Blocks the index keeps of one backend at most; more means removals were missed, and the "
        "backend is rebuilt from its events.",
    )


class TimeoutSettings(StrictModel):
    """Upstream timeouts, in seconds."""

    connect: float = Field(default=5.0, gt=0, description="TCP connect to a backend.")
    first_byte: float = Field(
        default=900.0, gt=0, description="Request sent to response headers (non-stream answers come whole)."
    )
    idle: float = Field(default=120.0, gt=0, description="Longest silence between two chunks of a response.")


class RetrySettings(StrictModel):
    """Retries happen only before the first byte reached the client, on another backend of the model."""

    max_retries: int = Field(default=2, ge=0, le=10)
    budget_ratio: float = Field(default=0.2, ge=0, le=1, description="Retries allowed per request, on average.")
    on_status: list[Annotated[int, Field(ge=400, le=599)]] = Field(
        default_factory=lambda: [503], description="Backend error statuses (4xx, 5xx) worth a retry."
    )
    budget_reserve: float = Field(
        default=10.0,
        ge=0,
        description="Retries the budget holds at most, and at start: how many may happen in one burst (a backend "
        "that dies with many streams on it needs one stream failover each).",
    )


class FailoverSettings(StrictModel):
    """Mid-stream failover: a chat or completions stream whose backend dies, stalls past `timeouts.idle` or sends
    an error event after content went out is continued on another backend of its model, as one stream."""

    enabled: bool = Field(
        default=True, description="Continue broken streams (a request opts out with X-Switchyard-Failover: off)."
    )
    max_attempts: int = Field(
        default=1, ge=0, le=10, description="Continuations per stream at most; each one spends from the retry budget."
    )


class HealthSettings(StrictModel):
    """Active checks (GET /health on every backend) and passive outlier ejection."""

    interval: float = Field(default=2.0, gt=0, description="Seconds between two /health checks of a backend.")
    timeout: float = Field(default=1.0, gt=0, description="A check slower than this failed.")
    unhealthy_threshold: int = Field(default=2, ge=1, description="Failed checks in a row that take a backend out.")
    healthy_threshold: int = Field(default=1, ge=1, description="Passed checks in a row that bring it back.")
    eject_after: int = Field(
        default=3, ge=1, description="Connect errors or 5xx answers in a row that eject a backend (passive)."
    )
    eject_base: float = Field(default=2.0, gt=0, description="First ejection's length in seconds; doubles each time.")
    eject_max: float = Field(default=60.0, gt=0, description="Longest ejection in seconds.")

    @model_validator(mode="after")
    def _check_ejection(self) -> HealthSettings:
        if self.eject_max < self.eject_base:
            raise ValueError(f"eject_max ({self.eject_max:g}) is shorter than eject_base ({self.eject_base:g})")
        return self


class ShutdownSettings(StrictModel):
    """What SIGTERM does: /ready turns 503 at once, the listener closes after `drain_delay` (time for a
    Kubernetes endpoint to be removed), and in-flight requests get up to `grace_period` to finish."""

    drain_delay: float = Field(default=0.0, ge=0)
    grace_period: float = Field(default=30.0, ge=0)


class ApiKeySettings(StrictModel):
    """One client key: who it is, which models it may use and how fast."""

    name: str = Field(min_length=1, description="Shown in logs and metrics instead of the key itself.")
    key: SecretStr | None = Field(default=None, description="The key (prefer key_env or keys_file).")
    key_env: str | None = Field(default=None, description="Environment variable holding the key.")
    models: list[str] = Field(default_factory=lambda: ["*"], description="Glob patterns of allowed model names.")
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0, description="Prompt + completion tokens (usage).")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySettings:
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"key {self.name!r}: give exactly one of `key` and `key_env`")
        if self.key_env is not None and not os.environ.get(self.key_env):
            raise ValueError(f"key {self.name!r}: key_env names {self.key_env!r}, which is not set")
        return self

    def secret(self) -> str:
        return self.key.get_secret_value() if self.key is not None else os.environ[self.key_env or ""]


class AuthSettings(StrictModel):
    """Client API keys. With none configured the gateway is open (put it behind your own auth)."""

    keys: list[ApiKeySettings] = Field(default_factory=list)
    keys_file: Path | None = Field(
        default=None, description="YAML file with more `keys` entries (e.g. a mounted Kubernetes Secret)."
    )

    @model_validator(mode="after")
    def _load_file(self) -> AuthSettings:
        if self.keys_file is not None:
            try:
                loaded = yaml.safe_load(self.keys_file.read_text(encoding="utf-8")) or []
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ValueError(f"cannot read keys_file {self.keys_file}: {exc}") from exc
            entries = loaded.get("keys", []) if isinstance(loaded, dict) else loaded
            if not isinstance(entries, list):
                raise ValueError(f"keys_file {self.keys_file} must hold a list of keys")
            object.__setattr__(self, "keys", [*self.keys, *(ApiKeySettings.model_validate(e) for e in entries)])
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        if len({key.secret() for key in self.keys}) != len(self.keys):
            raise ValueError("two entries hold the same key")
        return self


class TracingSettings(StrictModel):
    """OpenTelemetry traces (the exporter follows the standard OTEL_* environment variables; see gateway/tracing.py)."""

    enabled: bool = Field(default=False, description="Export a span per request and per upstream attempt.")


class AdminSettings(StrictModel):
    """The read-only admin endpoint GET /admin/fleet: off unless a key is configured."""

    key_env: str | None = Field(
        default=None,
        description="Environment variable holding the admin bearer key (distinct from every API key); unset: "
        "the admin endpoint does not exist.",
    )

    @model_validator(mode="after")
    def _check_key(self) -> AdminSettings:
        if self.key_env is not None and not os.environ.get(self.key_env):
            raise ValueError(f"key_env names {self.key_env!r}, which is not set")
        return self

    def key(self) -> str | None:
        return os.environ[self.key_env] if self.key_env else None


class LimitSettings(StrictModel):
    """Bounds on what one request may carry."""

    max_header_count: int = Field(default=100, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, gt=0, description="All header names and values together.")
    max_json_depth: int = Field(default=64, gt=0, description="Deepest nesting of arrays/objects in a JSON body.")
    header_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a connection has to send a complete request head, from connecting or from the "
        "first byte of its next request; slower ones are closed (nginx's client_header_timeout).",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Longest silence while a request body arrives; then 408 (nginx's client_body_timeout).",
    )
    keep_alive_timeout: int = Field(
        default=75,
        gt=0,
        description="Seconds an idle client connection stays open for its next request (nginx's keepalive_timeout). "
        "Longer than clients' own pool expiry (5 s in httpx and so the openai SDK): a server that closes first "
        "races the client's next request on that connection, which then fails with a reset.",
    )


class Settings(BaseSettings):
    """All gateway settings. Env vars use the prefix SWITCHYARD_ and `__` between nested keys."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    discovery: Literal["static", "kubernetes"] = "static"
    backends: list[BackendSettings] = Field(default_factory=list)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    model_refresh_interval: float = Field(
        default=5.0, gt=0, description="Seconds between polls of each backend's GET /v1/models."
    )
    model_refresh_timeout: float = Field(default=2.0, gt=0, description="Timeout of one /v1/models poll.")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    upstream_keepalive: float = Field(
        default=4.0,
        gt=0,
        description="Seconds an idle upstream connection is kept; below uvicorn's 5 s so vLLM never closes "
        "a connection the pool is about to reuse.",
    )
    retry_after: int = Field(default=1, ge=0, description="Retry-After seconds sent with a 503.")
    retries: RetrySettings = Field(default_factory=RetrySettings)
    failover: FailoverSettings = Field(default_factory=FailoverSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    access_log: bool = Field(default=True, description="One JSON line per request on the switchyard.access logger.")
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    kv_events: KvEventSettings = Field(default_factory=KvEventSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)

    @model_validator(mode="after")
    def _check_discovery(self) -> Settings:
        if self.discovery == "static" and not self.backends:
            raise ValueError("static discovery needs at least one entry under `backends`")
        admin = self.admin.key()
        if admin is not None and admin in {key.secret() for key in self.auth.keys}:
            raise ValueError("admin.key_env holds an API key: the admin key must be a key of its own")
        if self.admission.stale_after <= self.routing.scrape_interval:
            raise ValueError(
                f"admission.stale_after ({self.admission.stale_after:g} s) must be longer than"
                f" routing.scrape_interval ({self.routing.scrape_interval:g} s): every scrape would count as stale"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs): pods set env, the chart ships the file.
        return env_settings, init_settings


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from a YAML file (if given), the environment and explicit overrides.

    Raises ConfigError with one line per bad key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
