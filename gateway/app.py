"""create_app(settings): the composition root. It builds the long-lived parts, wires them, and owns their
lifetime through the lifespan; nothing here is process-global, so tests build as many apps as they like."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NoReturn

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin import FleetView
from gateway.errors import GatewayError, error_parts, from_http_status
from gateway.fleet.discovery import Discovery
from gateway.fleet.discovery.static import StaticDiscovery
from gateway.fleet.engine_metrics import EngineScraper
from gateway.fleet.health import HealthChecker, OutlierDetector
from gateway.fleet.kv_events import KvEventHub
from gateway.fleet.model_poller import ModelPoller
from gateway.fleet.registry import Registry
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.proxy.access_log import AccessLog, LoggerAccessLog
from gateway.proxy.attempts import Attempts
from gateway.proxy.endpoint import STATE_KEY, Proxy, ProxyEndpoint
from gateway.proxy.gatekeeper import Gatekeeper
from gateway.proxy.outcome import Recorder
from gateway.proxy.relay import Relay
from gateway.proxy.responses_api import ResponseDirectory
from gateway.proxy.upstream import UpstreamPool
from gateway.routes import build_routes
from gateway.routing.admission import Admission
from gateway.routing.cache_aware import PrefixCaches
from gateway.routing.kv_index import KvIndex
from gateway.routing.policy_names import build_policy
from gateway.routing.router import Router
from gateway.routing.tokenizer import Tokenizer
from gateway.settings import Settings
from gateway.tenancy.auth import KeyRing
from gateway.tracing import Tracing


def _discovery(settings: Settings) -> Discovery:
    if settings.discovery == "kubernetes":
        from gateway.fleet.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(settings.kubernetes)
    return StaticDiscovery(settings.backends)


def _error_response(error: GatewayError) -> Response:
    status, headers, body = error_parts(error)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        detail = f"No route matches {request.method} {path}."
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {path}."
    else:
        detail = str(exc.detail)
    return _error_response(from_http_status(exc.status_code, detail))


class GatewayApp(Starlette):
    """Starlette, with the proxied POST routes dispatched straight from a dict: they answer their own errors,
    so Starlette's router, middleware and exception handlers would only add cost to every request.

    A middleware would therefore miss most of the traffic without a word; adding one is refused instead.
    Work that must see every request belongs in the proxy's stages (gateway/proxy/)."""

    def __init__(
        self,
        fast_routes: Mapping[str, ASGIApp],
        *,
        registry: Registry,
        metrics: Metrics,
        settings: Settings,
        lifecycle: Lifecycle,
        middleware: Sequence[Middleware] | None = None,
        **kwargs: Any,
    ) -> None:
        if middleware:
            self._refuse_middleware()
        super().__init__(**kwargs)
        self._fast_routes = fast_routes
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.lifecycle = lifecycle

    @property
    def fast_routes(self) -> Mapping[str, ASGIApp]:
        """The proxied POST routes by path: the gateway's server (gateway/http/) dispatches them itself."""
        return self._fast_routes

    def add_middleware(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse_middleware()

    @staticmethod
    def _refuse_middleware() -> NoReturn:
        raise TypeError("the gateway's proxied routes bypass ASGI middleware; put cross-cutting work in gateway/proxy/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._fast_routes.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _follow_fleet(caches: PrefixCaches, metrics: Metrics, registry: Registry) -> None:
    """Keep what is derived from the fleet's membership in step with it: the prefix caches, the metric series."""
    while True:
        caches.refresh(registry.backends)
        metrics.export_known_series(registry)
        await asyncio.sleep(1.0)


def create_app(settings: Settings, access_log: AccessLog | None = None, batch_records: bool = False) -> GatewayApp:
    """The gateway as an ASGI app. `access_log`: where its lines go when `settings.access_log` is on (default:
    the `switchyard.access` logger; `python -m gateway` passes a faster writer to its own stderr).
    `batch_records`: account for finished requests in batches (proxy/outcome.py), as `python -m gateway` does."""
    registry = Registry()
    metrics = Metrics(registry)
    admission = Admission(settings.admission, registry, metrics)
    outliers = OutlierDetector(registry, settings.health)
    kv_index = KvIndex(settings.kv_events.max_blocks_per_backend)
    caches = PrefixCaches(settings.routing, kv_index)
    policy = build_policy(settings.routing, caches=caches)
    hub = KvEventHub(registry, kv_index, metrics, settings.kv_events)
    keys = KeyRing(settings.auth)
    lifecycle = Lifecycle()
    discovery = _discovery(settings)
    log = (access_log or LoggerAccessLog()) if settings.access_log else None
    recorder = Recorder(metrics, log, batch=batch_records)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # The control plane's client: model polls, health checks and metric scrapes. Proxied requests (and the
        # Responses API lookups that route them) go through the UpstreamPool below.
        connector = aiohttp.TCPConnector(
            limit=0,  # a few connections per backend at most (one per background loop): no cap needed
            keepalive_timeout=settings.upstream_keepalive,
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeouts.connect)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,  # vLLM never compresses; nothing to undo
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        ) as session:
            poller = ModelPoller(registry, session, settings.model_refresh_interval, settings.model_refresh_timeout)
            tasks = [asyncio.create_task(discovery.run(registry), name="discovery")]
            await asyncio.sleep(0)  # let discovery publish what it already knows
            await poller.poll_all()  # so /ready and routing are right from the first request
            tasks.append(asyncio.create_task(poller.run(), name="model-poller"))
            scraper = EngineScraper(registry, session, settings.routing)
            tasks.append(asyncio.create_task(scraper.run(), name="engine-scraper"))
            pool = UpstreamPool(settings.upstream_keepalive, settings.timeouts.connect)
            # a backend the checks declare dead gives up the requests it has not begun to answer: tried elsewhere
            checker = HealthChecker(registry, session, settings.health, pool.abandon)
            tasks.append(asyncio.create_task(checker.run(), name="health-checker"))
            if settings.kv_events.enabled:
                tasks.append(asyncio.create_task(hub.run(session), name="kv-events"))
            tasks.append(asyncio.create_task(_follow_fleet(caches, metrics, registry), name="fleet-followers"))
            responses = ResponseDirectory(pool)
            tokenizer = Tokenizer(pool.fetch, settings.routing.tokenize_timeout)
            router = Router(policy, registry, settings.routing, caches, tokenizer)
            recorder.learn = router.observe
            relay = Relay(metrics, settings.timeouts.idle, responses, router)
            tracing = Tracing(settings.tracing.enabled)  # its export thread lives as long as the lifespan
            proxy = Proxy(
                Gatekeeper(settings, keys, registry, admission, responses),
                Attempts(settings, router, admission, outliers, pool, relay, metrics, registry, tracing),
                recorder,
                tracing,
            )
            try:
                yield {STATE_KEY: proxy}
            finally:
                recorder.flush()
                if log is not None:
                    log.flush()
                await tracing.shutdown()
                pool.close()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    fleet = FleetView(registry, caches, hub, admission, lifecycle, settings.admin.key())
    routes = build_routes(registry, metrics, lifecycle, keys, fleet, recorder)
    fast_routes = {
        route.path: route.app for route in routes if isinstance(route.app, ProxyEndpoint) and not route.param_convertors
    }
    return GatewayApp(
        fast_routes,
        registry=registry,
        metrics=metrics,
        settings=settings,
        lifecycle=lifecycle,
        routes=routes,
        lifespan=lifespan,
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error},
    )
