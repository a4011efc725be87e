"""A tiny upstream that reports what it received, to check what the gateway forwards (headers, the
exact body bytes, path and query). It serves /v1/models like vLLM so the gateway learns its models."""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def echo_app(models: list[str]) -> Starlette:
    cards: list[dict[str, Any]] = [
        {"id": name, "object": "model", "owned_by": "vllm", "root": name, "parent": None} for name in models
    ]

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": cards})

    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {
                "path": request.url.path,
                "query": request.url.query,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
            },
            headers={"x-upstream": "echo", "Connection": "keep-alive", "Keep-Alive": "timeout=5"},
        )

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/{path:path}", echo, methods=["POST"]),
        ]
    )
