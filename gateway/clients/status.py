"""`switchyard status`: the gateway's fleet view (GET /admin/fleet) as a table, the way `kubectl get` prints.

    switchyard status [--gateway URL] [--admin-key KEY] [-o table|json]

The admin key also comes from $SWITCHYARD_ADMIN_KEY. One row per model and backend: its state, this gateway's
requests in flight, the engine's queue and KV cache usage, how old the last scrape is, and what the router
knows of the backend's prefix cache (the KV event index's state and blocks, and the events' lag).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import IO, Any

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
KEY_ENV = "SWITCHYARD_ADMIN_KEY"
COLUMNS = ("MODEL", "BACKEND", "STATUS", "INFLIGHT", "QUEUE", "KV", "SCRAPE", "CACHE", "BLOCKS", "LAG")


class StatusError(Exception):
    """The fleet view could not be read; the message says why and what to do."""


def fetch(gateway: str, key: str | None, timeout: float = 10.0) -> dict[str, Any]:
    try:
        request = urllib.request.Request(f"{gateway.rstrip('/')}/admin/fleet")  # ValueError: not a URL
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError(f"{gateway} refused the admin key (401): pass --admin-key or set {KEY_ENV}") from None
        if exc.code == 404:
            raise StatusError(
                f"{gateway} has no admin endpoint: configure `admin: {{key_env: NAME}}` on the gateway"
            ) from None
        raise StatusError(f"{gateway} answered {exc.code} to GET /admin/fleet") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusError(f"cannot read {gateway}/admin/fleet: {getattr(exc, 'reason', exc)}") from None


def _state(backend: dict[str, Any]) -> str:
    if backend.get("ejected_for_s"):
        return f"Ejected({backend['ejected_for_s']:.0f}s)"
    if backend.get("draining"):
        return "Draining"
    if not backend.get("healthy"):
        return "Down"
    if not backend.get("live"):
        return "Unhealthy"
    return "Ready"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def rows(fleet: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for model in fleet.get("models", []):
        for backend in model.get("backends", []):
            engine = backend.get("engine") or {}
            cache = backend.get("cache") or {}
            events = cache.get("events") or {}
            lags = [s["lag_s"] for s in events.get("sources", []) if s.get("lag_s") is not None]
            out.append(
                (
                    str(model["model"]),
                    str(backend["url"]),
                    _state(backend),
                    str(backend.get("inflight", 0)),
                    "-" if not engine else f"{engine['waiting']:g}",
                    "-" if not engine else f"{100 * engine['kv_cache_usage']:.0f}%",
                    _seconds(engine.get("scrape_age_s")) if engine else "-",
                    str(cache.get("state", "-")),
                    str(cache.get("blocks", 0)),
                    _seconds(max(lags)) if lags else "-",
                )
            )
    return out


def table(fleet: dict[str, Any]) -> str:
    lines: Sequence[tuple[str, ...]] = [COLUMNS, *rows(fleet)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = "\n".join("   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip
    gateway = fleet.get("gateway", {})
    footer = f"gateway: {gateway.get('inflight', 0)} in flight, {gateway.get('waiting', 0)} waiting"
    if gateway.get("draining"):
        footer += ", draining"
    return f"{text}\n\n{footer}"


def main(argv: list[str] | None = None, out: IO[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchyard status", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help=f"the gateway's URL (default {DEFAULT_GATEWAY})")
    parser.add_argument("--admin-key", default=None, help=f"the gateway's admin key (default: ${KEY_ENV})")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    try:
        fleet = fetch(args.gateway, args.admin_key or os.environ.get(KEY_ENV))
    except StatusError as exc:
        print(f"switchyard status: {exc}", file=sys.stderr)
        return 1
    stream.write((json.dumps(fleet, indent=2) if args.output == "json" else table(fleet)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
