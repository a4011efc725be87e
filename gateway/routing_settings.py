"""Settings for routing policies, engine-metric scraping and admission control."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PolicyName = Literal["least_inflight"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoutingSettings(_Strict):
    policy: PolicyName = Field(default="least_inflight", description="Policy for models not listed in `models`.")
    models: dict[str, PolicyName] = Field(default_factory=dict, description="Policy per model name.")
    scrape_interval: float = Field(default=0.1, gt=0, description="Seconds between scrapes of each backend's /metrics.")
    scrape_timeout: float = Field(default=0.5, gt=0, description="Timeout of one /metrics scrape.")
    stale_after: float = Field(default=1.0, gt=0, description="A scrape older than this counts as unknown load.")


class AdmissionSettings(_Strict):
    max_inflight: int | None = Field(default=None, gt=0, description="Gateway-wide in-flight limit (none: unlimited).")
