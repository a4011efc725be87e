"""The registry's view of the fleet: what is known, what may take requests."""

from __future__ import annotations

import pytest

from gateway.fleet import registry as registry_module
from gateway.fleet.registry import DEPARTED_MODEL_S, BackendSpec, Registry


def test_a_departed_model_is_known_for_a_while_then_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: clock[0])
    registry = Registry()
    registry.reconcile([BackendSpec("http://a:1"), BackendSpec("http://b:1")])
    a, b = registry.backends
    registry.set_models(a, [{"id": "solo"}, {"id": "shared"}])
    registry.set_models(b, [{"id": "shared"}])
    registry.reconcile([BackendSpec("http://b:1")])  # a's pod is deleted
    assert registry.is_known("solo")
    assert registry.is_known("shared")
    assert registry.backends_per_model() == {"solo": 0, "shared": 1}
    assert registry.candidates("solo") == ()
    clock[0] += DEPARTED_MODEL_S - 1
    assert registry.is_known("solo")
    clock[0] += 2
    assert not registry.is_known("solo")
    assert registry.backends_per_model() == {"shared": 1}


def test_a_model_served_again_is_no_longer_departed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: clock[0])
    registry = Registry()
    registry.reconcile([BackendSpec("http://a:1")])
    registry.set_models(registry.backends[0], [{"id": "solo"}])
    registry.reconcile([])
    clock[0] = DEPARTED_MODEL_S / 2
    registry.reconcile([BackendSpec("http://c:1")])  # its successor, at another address
    registry.set_models(registry.backends[0], [{"id": "solo"}])
    registry.reconcile([])  # and that one leaves too: its hour starts now
    clock[0] = DEPARTED_MODEL_S + 1  # over an hour after the first departure
    assert registry.is_known("solo")
