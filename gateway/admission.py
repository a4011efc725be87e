"""Admission control: whether a request may go upstream now, wait, or be turned away."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from gateway.metrics import Metrics
from gateway.policies import RequestInfo
from gateway.registry import Registry
from gateway.routing_settings import AdmissionSettings


class Admission:
    def __init__(self, settings: AdmissionSettings, registry: Registry, metrics: Metrics) -> None:
        self._settings = settings
        self._registry = registry
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def admit(self, request: RequestInfo) -> AsyncIterator[None]:
        """Hold an admission slot for the request's whole life upstream (released on any exit)."""
        yield
