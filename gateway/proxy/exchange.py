"""One request's state as it goes through the proxy's stages, and the raw-ASGI sends they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, error_parts
from gateway.fleet.registry import Backend
from gateway.metrics import NO_MODEL
from gateway.proxy.disconnect import DisconnectWatch
from gateway.proxy.failover import FailoverPlan
from gateway.proxy.outcome import Outcome
from gateway.proxy.request_body import BodyKind
from gateway.routing.request import RequestInfo
from gateway.tenancy.auth import Principal


@dataclass(eq=False, slots=True)
class Exchange:
    """A request from its first byte to its last: what the client sent, what was decided, what happened.

    The gatekeeper fills in the principal, body and candidates; the attempts stage the watch; the outcome
    collects what the recorder measures and logs at the end."""

    scope: Scope
    receive: Receive
    send: Send
    route: str
    kind: BodyKind
    outcome: Outcome
    label: str = NO_MODEL  # the model label of its metrics: NO_MODEL, then UNKNOWN_MODEL, then the model
    principal: Principal | None = None
    body: bytes = b""
    candidates: Sequence[Backend] = ()
    hide_usage: bool = False  # the gateway asked for the stream's usage: hide it from the client
    failover: FailoverPlan | None = None  # a chat or completions stream: continued elsewhere if its backend fails
    watch: DisconnectWatch | None = None  # while a response may still be cut short by the client leaving
    span: Span | None = None  # its server span, when tracing is on
    attempts: int = 0  # upstream requests opened for it (first try, retries, continuations)

    @property
    def info(self) -> RequestInfo:
        return self.outcome.info

    async def send_error(self, error: GatewayError) -> None:
        status, headers, payload = error_parts(error)
        headers.append((b"x-request-id", self.outcome.request_id))
        headers.append((b"content-length", b"%d" % len(payload)))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": payload})
        self.outcome.status = status

    async def finish(self, body: bytes) -> None:
        """Send the answer's last bytes. From here a disconnect is the normal end of the exchange, not an abort."""
        if self.watch is not None:
            self.watch.finishing = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
