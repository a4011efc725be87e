"""`python -m gateway` / `switchyard gateway`: argv and env -> Settings -> uvicorn serving create_app."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import socket
import sys
import time
from types import FrameType

import uvicorn

from gateway.app import create_app
from gateway.errors import ConfigError
from gateway.http.protocol import protocol_class
from gateway.lifecycle import Lifecycle
from gateway.proxy.access_log import LOGGER, StreamAccessLog
from gateway.settings import load_settings

# Each proxied request allocates a few hundred container objects, so CPython's default collector (a young
# collection every 700 allocations, a full one over every long-lived object now and then) took about a fifth
# of the gateway's CPU under load. A larger young generation, and the startup objects frozen out of full
# collections, keep the collector's work in proportion to the garbage requests actually leave.
GC_YOUNG_THRESHOLD = 10_000
# A middle collection examines what survived the young ones since the last, GC_MIDDLE_THRESHOLD + 2 young
# generations in all. At CPython's 10 that was ~100,000 objects when 2,000 streams opened in a burst, and every
# open stream stalled for 31-67 ms; at 2 a stall is at most 35 ms, for the same total work (each survivor is
# examined in one middle collection either way). A full collection waits for GC_OLD_THRESHOLD + 1 middle
# ones: at 50, about 200 young generations, so full collections stay as rare as before (about 130).
GC_MIDDLE_THRESHOLD = 2
GC_OLD_THRESHOLD = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="switchyard gateway",
        description="Run the Switchyard gateway. Every setting can also come from SWITCHYARD_* env vars "
        "(nested keys joined by __, e.g. SWITCHYARD_TIMEOUTS__IDLE=60); env overrides the file.",
    )
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config, host=args.host, port=args.port, log_level=args.log_level)
    except ConfigError as exc:
        print(f"switchyard gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # This process owns its logging: access lines go to stderr in batches, formatted as the root handler would.
    access = StreamAccessLog(sys.stderr.fileno()) if logging.getLogger(LOGGER).isEnabledFor(logging.INFO) else None
    app = create_app(settings, access, batch_records=True)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(
            settings.limits.header_timeout, settings.limits.max_header_count, settings.limits.max_header_bytes
        ),
        lifespan="on",
        access_log=False,  # the gateway writes its own JSON access log (switchyard.access)
        proxy_headers=False,  # trust no X-Forwarded-For by default; the peer address is the client
        log_level=settings.log_level,
        # whole seconds, rounded up (uvicorn's type); 0 stays 0: nothing waited for (None would wait forever)
        timeout_graceful_shutdown=math.ceil(settings.shutdown.grace_period),
        timeout_keep_alive=settings.limits.keep_alive_timeout,
    )
    server = DrainingServer(config, app.lifecycle, settings.shutdown.drain_delay)
    tune_collector()
    server.run()
    return 0 if server.started else 1


def tune_collector() -> None:
    """This process's collector: a young collection every GC_YOUNG_THRESHOLD allocations (not 700), middle
    collections kept small, full ones rare."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, GC_OLD_THRESHOLD)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /ready turns 503 at once and the listener stays open for
    `drain_delay` seconds (so load balancers stop sending), then uvicorn's own graceful shutdown lets
    in-flight requests finish. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_delay: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._drain_delay = drain_delay
        self._exit_at: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # The lifespan has built every long-lived resource: move them out of the collector's way.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._lifecycle.draining:  # the second signal: no more waiting, for the drain or for requests
            self.should_exit = self.force_exit = True
            return
        if self._drain_delay <= 0:
            self._lifecycle.draining = True
            super().handle_exit(sig, frame)
            return
        logging.getLogger("switchyard").info("draining for %.1f s before shutdown", self._drain_delay)
        self._lifecycle.draining = True
        self._exit_at = time.monotonic() + self._drain_delay

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


if __name__ == "__main__":
    sys.exit(main())
