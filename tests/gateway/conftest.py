"""Which event loops the async tests under tests/gateway run on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

# Modules whose every case runs on both loops: code that talks to transports and timers directly, where
# uvloop (what the gateway runs on) and asyncio differ.
BOTH_LOOPS = frozenset({"tests.gateway.proxy.test_upstream"})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
