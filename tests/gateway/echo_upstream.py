"""A tiny upstream that reports what it received, to check what the gateway forwards (headers, the
exact body bytes, path and query). It serves /v1/models like vLLM so the gateway learns its models."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Behaviour:
    """Switches a test flips while the upstream runs."""

    health_status: int = 200
    answer_status: int = 200


def echo_app(models: list[str], behaviour: Behaviour | None = None) -> Starlette:
    behaviour = behaviour or Behaviour()
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
            status_code=behaviour.answer_status,
            headers={"x-upstream": "echo", "Connection": "keep-alive", "Keep-Alive": "timeout=5"},
        )

    async def health(request: Request) -> Response:
        return Response(status_code=behaviour.health_status)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/{path:path}", echo, methods=["POST"]),
        ]
    )


def forwarded_headers(response: httpx.Response) -> dict[str, str]:
    """The headers the echo upstream received, lower-cased, from its answer."""
    return {name.lower(): value for name, value in response.json()["headers"]}
