"""Pure translation of discovery.k8s.io/v1 EndpointSlice JSON into backend specs.

Kept apart from the watch loop so the mapping rules (ports, conditions, address families) are easy to read
and to test on their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.fleet.kv_protocol import KvSource
from gateway.fleet.registry import BackendSpec

JSON = Mapping[str, Any]


def _port(slice_: JSON, port_name: str) -> int | None:
    for port in slice_.get("ports") or ():
        # An unnamed port is serialised as "" (or left out); `port` is null when the Service's port matches
        # no container port, which makes the slice useless to us.
        if (port.get("name") or "") == port_name and isinstance(port.get("port"), int):
            return int(port["port"])
    return None


def _host(address: str, address_type: str) -> str:
    return f"[{address}]" if address_type == "IPv6" else address


def specs_from_slice(
    slice_: JSON,
    *,
    port_name: str,
    scheme: str,
    api_key: str | None,
    kv_events_port_name: str | None = None,
    kv_replay_port_name: str | None = None,
) -> list[BackendSpec]:
    """One spec per endpoint of the slice; an endpoint that is not ready or is terminating is draining.

    Condition defaults follow the API: a missing `ready` means ready, a missing `terminating` means not.
    When the slice names a KV events port, the endpoint's KV event publisher is at that port of the same
    address (and its replay socket at the replay port, when named).
    """
    port = _port(slice_, port_name)
    if port is None:
        return []
    events = _port(slice_, kv_events_port_name) if kv_events_port_name else None
    replay = _port(slice_, kv_replay_port_name) if kv_replay_port_name else None
    address_type = str(slice_.get("addressType", "IPv4"))
    specs = []
    for endpoint in slice_.get("endpoints") or ():
        addresses = endpoint.get("addresses") or ()
        if not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        ready = conditions.get("ready") is not False
        terminating = conditions.get("terminating") is True
        # The API says addresses are fungible and consumers may use the first one only.
        host = _host(str(addresses[0]), address_type)
        url = f"{scheme}://{host}:{port}"
        sources: tuple[KvSource, ...] = ()
        if events is not None:
            replay_endpoint = f"tcp://{host}:{replay}" if replay is not None else None
            sources = (KvSource(f"tcp://{host}:{events}", replay_endpoint),)
        specs.append(BackendSpec(url=url, api_key=api_key, draining=terminating or not ready, kv_sources=sources))
    return specs


def merge(groups: Iterable[Iterable[BackendSpec]]) -> list[BackendSpec]:
    """Union of specs by URL. When two slices disagree about one address (a pod that is moving between
    slices, or selected by two Services), ready wins: one ready report means it can take traffic."""
    merged: dict[str, BackendSpec] = {}
    for group in groups:
        for spec in group:
            seen = merged.get(spec.url)
            if seen is None or (seen.draining and not spec.draining):
                merged[spec.url] = spec
    return sorted(merged.values(), key=lambda spec: spec.url)
