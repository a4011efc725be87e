"""The route table: which paths are proxied (and how their model is found) and the gateway's own
endpoints. Handlers stay thin; the work lives in proxy/ and fleet/registry.py."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admin import FleetView
from gateway.errors import ModelNotFound
from gateway.fleet.registry import ModelCard, Registry
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.outcome import Recorder
from gateway.proxy.request_body import BodyKind
from gateway.tenancy.auth import KeyRing

# POST routes whose JSON body names the model.
JSON_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/score",
    "/rerank",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
)
# POST routes with a multipart/form-data body whose form field `model` names the model.
MULTIPART_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")


def build_routes(
    registry: Registry, metrics: Metrics, lifecycle: Lifecycle, keys: KeyRing, fleet: FleetView, recorder: Recorder
) -> list[Route]:
    def visible_cards(request: Request) -> list[ModelCard]:
        cards = registry.cards()
        if not keys.enabled:
            return cards
        principal = keys.authenticate(request.scope)
        return [card for card in cards if principal.may_use(str(card["id"]))]

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if lifecycle.draining:
            return JSONResponse({"status": "shutting down", "models": []}, status_code=503)
        if registry.ready():
            return JSONResponse({"status": "ready", "models": registry.served_models()})
        return JSONResponse({"status": "not ready", "models": []}, status_code=503)

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        recorder.flush()  # requests still waiting in its batch are counted in this scrape
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": visible_cards(request)})

    async def get_model(request: Request) -> Response:
        model = request.path_params["model"]
        for card in visible_cards(request):
            if card["id"] == model:
                return JSONResponse(card)
        raise ModelNotFound(model)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/admin/fleet", fleet.endpoint, methods=["GET"]),
    ]
    routes += [Route(path, ProxyEndpoint(path, BodyKind.JSON), methods=["POST"]) for path in JSON_ROUTES]
    by_id = BodyKind.RESPONSE_ID
    routes += [
        Route("/v1/responses/{response_id}", ProxyEndpoint("/v1/responses/{id}", by_id), methods=["GET"]),
        Route(
            "/v1/responses/{response_id}/cancel",
            ProxyEndpoint("/v1/responses/{id}/cancel", by_id),
            methods=["POST"],
        ),
    ]
    routes += [Route(path, ProxyEndpoint(path, BodyKind.MULTIPART), methods=["POST"]) for path in MULTIPART_ROUTES]
    return routes
