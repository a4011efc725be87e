"""The gateway CLI (`python -m gateway`) with one extra route, GET /__probe, for leak tests: the number of
asyncio tasks on the gateway's loop and the in-flight count the registry holds. Nothing else differs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import gateway.server
from gateway.app import create_app
from gateway.proxy.access_log import AccessLog
from gateway.settings import Settings


def create_probed_app(
    settings: Settings, access_log: AccessLog | None = None, batch_records: bool = False
) -> Starlette:
    app = create_app(settings, access_log, batch_records)

    async def probe(request: Request) -> Response:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
        registry: Any = app.registry
        return JSONResponse(
            {
                "tasks": len(tasks),
                "task_names": sorted(task.get_name() for task in tasks),
                "inflight": sum(backend.inflight for backend in registry.backends),
            }
        )

    app.router.routes.insert(0, Route("/__probe", probe, methods=["GET"]))
    return app


if __name__ == "__main__":
    gateway.server.create_app = create_probed_app  # type: ignore[attr-defined]
    sys.exit(gateway.server.main(sys.argv[1:]))
