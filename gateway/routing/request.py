"""What routing knows of one request: the input of policies and admission."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.routing.prompt import PromptView


@dataclass(eq=False, slots=True)
class RequestInfo:
    """What a policy may look at: the model, the parsed body (None for multipart), and the headers.

    Built once per request by the gatekeeper; only the router adds to it (`prompt`), before the first pick."""

    model: str
    route: str
    payload: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # those routing reads (session, priority), lower-case
    tenant: str = ""  # API key name, or the client address when no keys are configured
    size: int = 0  # bytes of the request body: a body shorter than one prefix block holds no block to route by
    prompt: PromptView | None = None  # read off the payload (and tokenized) by the router, for the prefix indexes
