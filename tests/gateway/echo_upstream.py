"""A tiny upstream that reports what it received, to check what the gateway forwards (headers, the
exact body bytes, path and query). It serves /v1/models like vLLM so the gateway learns its models."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
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

    responses: set[str] = set()  # ids of Responses API objects this server "holds in memory"

    async def create_response(request: Request) -> Response:
        answer = await echo(request)
        response_id = f"resp_{request.url.port}_{len(responses)}"
        responses.add(response_id)
        payload = {"id": response_id, "object": "response", "echo": orjson.loads(answer.body)}
        return Response(orjson.dumps(payload), media_type="application/json")

    async def get_response(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if response_id not in responses:
            return JSONResponse({"error": {"message": "not found", "type": "NotFoundError"}}, status_code=404)
        return JSONResponse({"id": response_id, "object": "response", "server_port": request.url.port})

    async def health(request: Request) -> Response:
        return Response(status_code=behaviour.health_status)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/responses", create_response, methods=["POST"]),
            Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
            Route("/v1/responses/{response_id}/cancel", get_response, methods=["POST"]),
            Route("/{path:path}", echo, methods=["POST"]),
        ]
    )


def forwarded_headers(response: httpx.Response) -> dict[str, str]:
    """The headers the echo upstream received, lower-cased, from its answer."""
    return received_headers(response.json())


def received_headers(echo: dict[str, Any]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in echo["headers"]}
