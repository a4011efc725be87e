"""Building blocks shared by every settings model: strictness, and upstream API keys named by env var."""

from __future__ import annotations

import os
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

UPSTREAM_KEY = re.compile(r"[\x21-\x7e]+")  # what may follow "Authorization: Bearer " on the wire


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo stops the gateway, naming the key) and settings never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamKeyEnv(StrictModel):
    """A model with `api_key_env`: the name of an environment variable holding a key sent to upstreams."""

    api_key_env: str | None = Field(
        default=None, description="Name of an environment variable holding the upstream's API key."
    )

    @model_validator(mode="after")
    def _check_key_env(self) -> UpstreamKeyEnv:
        name = self.api_key_env
        if name is None:
            return self
        if name not in os.environ:
            raise ValueError(f"api_key_env names {name!r}, which is not set in the environment")
        if not UPSTREAM_KEY.fullmatch(os.environ[name]):
            # checked here, once: a newline would inject header lines, a non-ASCII byte fail every request
            raise ValueError(f"the key in {name} must be printable ASCII without spaces (it goes into a header)")
        return self

    def api_key(self) -> str | None:
        return os.environ[self.api_key_env] if self.api_key_env else None
