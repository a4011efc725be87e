"""`python -m gateway` / `switchyard gateway`: argv and env -> Settings -> uvicorn serving create_app."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from gateway.app import create_app
from gateway.errors import ConfigError
from gateway.settings import load_settings


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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # one line per request is issue-6 work and must stay off the hot path by default
        log_level=settings.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
