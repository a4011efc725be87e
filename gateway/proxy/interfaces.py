"""The narrow views of the rest of the gateway that the proxy works through.

The proxy never sees the fleet's loops, the policies or the admission queue themselves: only what a request
needs of them. `app.create_app` wires the real ones (Registry, Router, Admission, OutlierDetector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.fleet.registry import Backend
from gateway.routing.request import RequestInfo
from gateway.tenancy.auth import Principal


class BackendDirectory(Protocol):
    """Which models exist and which backends may take their requests now."""

    def is_known(self, model: str) -> bool: ...
    def served_models(self) -> list[str]: ...
    def candidates(self, model: str) -> tuple[Backend, ...]: ...
    def routable_backends(self) -> tuple[Backend, ...]: ...
    def out_of_service(self, url: str) -> bool: ...


class Picker(Protocol):
    """Chooses a backend for a request and counts it in flight there until `release`."""

    async def prepare(self, request: RequestInfo, candidates: Sequence[Backend]) -> RequestInfo:
        """What routing needs of the request before its first pick (its prompt's tokens, for one)."""

    def pick(self, candidates: Sequence[Backend], request: RequestInfo) -> Backend: ...
    def predicted_cached(self, request: RequestInfo, backend: Backend) -> int | None: ...
    def prompt_tokens(self, request: RequestInfo) -> int | None:
        """The request's prompt tokens as routing knows them (exact when tokenized), or None."""

    def discharge(self, request: RequestInfo) -> None:
        """The request's first token came: its prefill no longer weighs on its backend."""

    def release(self, backend: Backend, request: RequestInfo) -> None: ...


class AdmissionGate(Protocol):
    """Whether a request may go upstream now; every 429 comes from here."""

    def rate_limit(self, principal: Principal, model: str) -> list[tuple[bytes, bytes]]: ...
    def try_enter(self, request: RequestInfo) -> bool: ...
    async def enter(self, request: RequestInfo) -> None: ...
    def leave(self, model: str) -> None: ...


class BackendFeedback(Protocol):
    """What requests saw of a backend (passive health: repeated failures eject it for a while)."""

    def success(self, backend: Backend) -> None: ...
    def failure(self, backend: Backend) -> None: ...
