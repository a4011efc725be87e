"""The EndpointSlice -> backend mapping rules, on real EndpointSlice JSON."""

from __future__ import annotations

from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]

from gateway.fleet.discovery.endpointslices import merge, specs_from_slice
from gateway.fleet.registry import BackendSpec
from tests.gateway.fleet.discovery.fake_apiserver import endpoint_slice


def specs(slice_: dict[str, Any], port_name: str = "http") -> list[BackendSpec]:
    return specs_from_slice(slice_, port_name=port_name, scheme="http", api_key=None)


def test_fixture_is_a_valid_endpointslice() -> None:
    kubernetes_validate.validate(endpoint_slice("sy-a-x1", "ns", [("10.0.0.1", True, False)]), "1.31.0", strict=True)


def test_conditions_map_to_draining() -> None:
    slice_ = endpoint_slice(
        "sy-a-x1", "ns", [("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", False, True)]
    )
    assert specs(slice_) == [
        BackendSpec("http://10.0.0.1:8000"),
        BackendSpec("http://10.0.0.2:8000", draining=True),  # not ready (still loading, or failing /health)
        BackendSpec("http://10.0.0.3:8000", draining=True),  # terminating
    ]


def test_missing_conditions_follow_api_defaults() -> None:
    slice_ = endpoint_slice("sy-a-x1", "ns", [("10.0.0.1", True, False), ("10.0.0.2", True, False)])
    slice_["endpoints"][0]["conditions"] = {}  # nil ready means ready
    del slice_["endpoints"][1]["conditions"]
    assert [spec.draining for spec in specs(slice_)] == [False, False]


def test_port_is_chosen_by_name() -> None:
    slice_ = endpoint_slice("sy-a-x1", "ns", [("10.0.0.1", True, False)])
    slice_["ports"] = [{"name": "metrics", "port": 9090, "protocol": "TCP"}, {"name": "http", "port": 8000}]
    assert specs(slice_) == [BackendSpec("http://10.0.0.1:8000")]
    assert specs(slice_, port_name="grpc") == []
    slice_["ports"] = [{"port": 8000, "protocol": "TCP"}]  # an unnamed port
    assert specs(slice_, port_name="") == [BackendSpec("http://10.0.0.1:8000")]
    slice_["ports"] = [{"name": "http", "port": None}]  # the Service's targetPort matched no container port
    assert specs(slice_) == []


def test_ipv6_addresses_are_bracketed_and_empty_endpoints_skipped() -> None:
    slice_ = endpoint_slice("sy-a-x1", "ns", [("fd00::5", True, False)], address_type="IPv6")
    slice_["endpoints"].append({"addresses": [], "conditions": {"ready": True}})
    assert specs(slice_) == [BackendSpec("http://[fd00::5]:8000")]
    assert specs({"metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": None, "ports": None}) == []


def test_merge_prefers_a_ready_report() -> None:
    old = [BackendSpec("http://10.0.0.1:8000", draining=True), BackendSpec("http://10.0.0.2:8000")]
    new = [BackendSpec("http://10.0.0.1:8000")]
    assert merge([old, new]) == [BackendSpec("http://10.0.0.1:8000"), BackendSpec("http://10.0.0.2:8000")]
    assert merge([new, old])[0].draining is False
