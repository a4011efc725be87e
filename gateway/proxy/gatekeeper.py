"""The first stage of a request: what it must pass before it may go upstream.

In order: header limits, the client's key, the body (bounded, parsed once), the model it names (or the
response it continues), the key's rate limits, and at least one backend that may take it. Each failure is a
GatewayError the proxy answers; on success the exchange holds the body, the routing view and the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import HeadersTooLarge, ModelNotFound, ModelRequired, NoHealthyBackend, ResponseNotFound
from gateway.fleet.registry import Backend
from gateway.metrics import UNKNOWN_MODEL
from gateway.proxy.exchange import Exchange
from gateway.proxy.failover import FailoverPolicy
from gateway.proxy.headers import client_host, header
from gateway.proxy.interfaces import AdmissionGate, BackendDirectory
from gateway.proxy.request_body import BodyKind, read_body, routing_fields
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.usage import wants_usage_injection
from gateway.routing.request import RequestInfo
from gateway.settings import Settings
from gateway.tenancy.auth import KeyRing, Principal

RESPONSES_ROUTE = "/v1/responses"


class Gatekeeper:
    def __init__(
        self,
        settings: Settings,
        keys: KeyRing,
        directory: BackendDirectory,
        gate: AdmissionGate,
        responses: ResponseDirectory,
    ) -> None:
        self._limits = settings.limits
        # The only headers routing reads (sessions, priorities): decoded for it, the rest left as they are.
        self._routing_headers = frozenset(
            {settings.routing.session_header.lower().encode(), settings.admission.priority_header.lower().encode()}
        )
        self._max_body = settings.max_body_bytes
        self._retry_seconds = settings.retry_after
        self._retry_after = {"Retry-After": str(settings.retry_after)}
        self._keys = keys
        self._directory = directory
        self._gate = gate
        self._responses = responses
        self._failover = FailoverPolicy(settings.failover)

    async def check(self, exchange: Exchange) -> None:
        scope = exchange.scope
        self._check_headers(exchange)
        if self._keys.enabled:
            exchange.principal = self._keys.authenticate(scope)
        principal = exchange.principal
        limits = self._limits
        body = await read_body(scope, exchange.receive, self._max_body, limits.body_timeout)
        fields = routing_fields(exchange.kind, body, header(scope, b"content-type"), limits.max_json_depth)
        exchange.label = UNKNOWN_MODEL
        if exchange.kind is BodyKind.RESPONSE_ID:
            routable = self._directory.routable_backends()
            if not routable:
                raise NoHealthyBackend("No backend can take requests right now.", headers=dict(self._retry_after))
            pool = routable
            if principal is not None:  # only where the key's models are: another key's response stays unseen
                pool = tuple(b for b in pool if any(principal.may_use(name) for name in b.models))
            candidates = await self._response_owner(scope["path_params"]["response_id"], pool)
            model = _base_model(candidates[0])
        else:
            model = self._resolve_model(fields.model, principal)
            candidates = self._directory.candidates(model)
        exchange.label = model
        if principal is not None:
            exchange.outcome.extra_headers = self._gate.rate_limit(principal, model)
        if not candidates:
            raise NoHealthyBackend.for_model(model, self._retry_seconds)
        payload = fields.payload
        previous = payload.get("previous_response_id") if payload else None
        if isinstance(previous, str) and exchange.route == RESPONSES_ROUTE:
            candidates = await self._response_owner(previous, candidates)
        exchange.outcome.info = RequestInfo(
            model=model,
            route=exchange.route,
            payload=payload,
            headers={
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in scope["headers"]
                if name in self._routing_headers
            },
            tenant=principal.name if principal else client_host(scope),
            size=len(body),
        )
        exchange.body = body
        exchange.candidates = candidates
        exchange.hide_usage = wants_usage_injection(exchange.route, payload)
        exchange.failover = self._failover.plan(exchange.route, payload, scope)

    def _check_headers(self, exchange: Exchange) -> None:
        headers = exchange.scope["headers"]
        limits = self._limits
        if len(headers) > limits.max_header_count:
            raise HeadersTooLarge(f"The request has more than {limits.max_header_count} headers.")
        if sum(len(name) + len(value) for name, value in headers) > limits.max_header_bytes:
            raise HeadersTooLarge(f"The request headers exceed {limits.max_header_bytes} bytes.")

    def _resolve_model(self, model: str | None, principal: Principal | None) -> str:
        directory = self._directory
        if model is None:
            served = directory.served_models()
            if principal is not None:
                served = [name for name in served if principal.may_use(name)]
            if len(served) == 1:
                return served[0]
            if not served:
                raise NoHealthyBackend("No backend serves any model right now.", headers=dict(self._retry_after))
            raise ModelRequired(f"`model` is required: this gateway serves {len(served)} models.", param="model")
        if directory.is_known(model) and (principal is None or principal.may_use(model)):
            return model
        raise ModelNotFound(model)  # also for a model the key may not use: its existence is not revealed

    async def _response_owner(self, response_id: str, pool: Sequence[Backend]) -> Sequence[Backend]:
        """The one backend of `pool` holding a Responses API response; NoHealthyBackend (503) when it may be on
        one that cannot be reached now, else ResponseNotFound (404)."""
        owner, out_of_reach = await self._responses.locate(response_id, pool, self._directory.out_of_service)
        if owner is not None:
            return (owner,)
        if out_of_reach:
            raise NoHealthyBackend(
                f"The backend holding response '{response_id}' cannot be reached right now.",
                headers=dict(self._retry_after),
            )
        raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")


def _base_model(backend: Backend) -> str:
    """The backend's base model (the card without a parent), for metric labels."""
    return next((name for name, card in backend.models.items() if not card.get("parent")), UNKNOWN_MODEL)
