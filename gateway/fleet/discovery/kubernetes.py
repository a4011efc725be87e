"""Workers found through the Kubernetes API: EndpointSlices selected by label, listed then watched.

Per namespace this is a small informer: list (which gives a resourceVersion), watch from that version,
re-open the watch from the last version seen when it ends or drops, and re-list when the server answers
410 Gone (the version was compacted away). Errors back off exponentially with jitter. The last known
state is kept while the API server is unreachable: the workers themselves may be fine, and the model
poller notices the ones that are not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio.client import ApiClient, Configuration, DiscoveryV1Api
from kubernetes_asyncio.config import load_incluster_config, load_kube_config

from gateway.fleet.discovery.endpointslices import merge, specs_from_slice
from gateway.fleet.registry import BackendSpec, Registry
from gateway.settings import KubernetesSettings

log = logging.getLogger(__name__)

# A watch that ends this fast without delivering anything counts as a failure, so a server that keeps
# closing watches at once is retried with backoff rather than in a tight loop.
_SHORT_WATCH_SECONDS = 1.0
_LIST_PAGE_SIZE = 500


class _Gone(Exception):
    """The resourceVersion we watch from is too old: re-list."""


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Backoff:
    """Exponential delays with jitter: initial, 2x, 4x ... up to maximum."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = max(initial, maximum)
        self._next = initial

    def reset(self) -> None:
        self._next = self._initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay * random.uniform(0.5, 1.0)


async def _status_message(response: aiohttp.ClientResponse) -> str:
    body = await response.read()
    try:
        status = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode(errors="replace")
    return str(status.get("message", "")) if isinstance(status, dict) else str(status)


class _NamespaceWatch:
    """The EndpointSlices of one namespace, kept current by list + watch."""

    def __init__(
        self,
        api: DiscoveryV1Api,
        namespace: str,
        settings: KubernetesSettings,
        api_key: str | None,
        on_change: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.slices: dict[str, list[BackendSpec]] = {}  # slice name -> its endpoints as specs
        self.resource_version: str | None = None
        self._api = api
        self._settings = settings
        self._api_key = api_key
        self._on_change = on_change
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)

    def _specs(self, slice_: dict[str, Any]) -> list[BackendSpec]:
        return specs_from_slice(
            slice_,
            port_name=self._settings.port_name,
            scheme=self._settings.scheme,
            api_key=self._api_key,
            kv_events_port_name=self._settings.kv_events_port_name,
            kv_replay_port_name=self._settings.kv_replay_port_name,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        gone_in_a_row = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    self._backoff.reset()
                started = loop.time()
                events = await self._watch()
                if events:
                    self._backoff.reset()
                    gone_in_a_row = 0
                elif loop.time() - started < _SHORT_WATCH_SECONDS:
                    await asyncio.sleep(self._backoff.next())
            except _Gone:
                log.info("namespace %s: resourceVersion expired, re-listing EndpointSlices", self.namespace)
                self.resource_version = None
                if gone_in_a_row:  # a fresh list's version expiring at once: do not hammer the server
                    await asyncio.sleep(self._backoff.next())
                gone_in_a_row += 1
            except (aiohttp.ClientError, TimeoutError, OSError, _ApiError) as exc:
                # The connection or the server failed: resume the watch from the last version seen.
                await self._retry_later(exc)
            except ValueError as exc:
                # Malformed JSON or event: resuming could replay it, so start over from a fresh list.
                self.resource_version = None
                await self._retry_later(exc)
            except Exception:
                delay = self._backoff.next()
                log.exception("namespace %s: unexpected discovery error; re-listing in %.2fs", self.namespace, delay)
                self.resource_version = None
                await asyncio.sleep(delay)

    async def _retry_later(self, exc: Exception) -> None:
        delay = self._backoff.next()
        log.warning(
            "namespace %s: EndpointSlice %s failed (%s); retrying in %.2fs",
            self.namespace,
            "list" if self.resource_version is None else "watch",
            str(exc) or type(exc).__name__,
            delay,
        )
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        slices: dict[str, list[BackendSpec]] = {}
        token: str | None = None
        version: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "label_selector": self._settings.label_selector,
                "limit": _LIST_PAGE_SIZE,
            }
            if token:
                kwargs["_continue"] = token
            response: aiohttp.ClientResponse = await self._api.list_namespaced_endpoint_slice(  # type: ignore[assignment]
                self.namespace,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=self._settings.request_timeout),
                **kwargs,
            )
            async with response:
                if response.status != 200:
                    raise _ApiError(response.status, await _status_message(response))
                body = orjson.loads(await response.read())
            for item in body.get("items") or ():
                slices[str(item["metadata"]["name"])] = self._specs(item)
            metadata = body.get("metadata") or {}
            version = metadata.get("resourceVersion")
            token = metadata.get("continue")
            if not token:
                break
        if not version:
            raise _ApiError(200, "list response has no metadata.resourceVersion")
        self.slices = slices
        self.resource_version = str(version)
        log.info("namespace %s: listed %d EndpointSlice(s) at version %s", self.namespace, len(slices), version)
        self._on_change()

    async def _watch(self) -> int:
        """Follow one watch request to its end; return how many events it delivered."""
        timeout = self._settings.watch_timeout
        response: aiohttp.ClientResponse = await self._api.list_namespaced_endpoint_slice(  # type: ignore[assignment]
            self.namespace,
            label_selector=self._settings.label_selector,
            watch=True,
            resource_version=self.resource_version or "",
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _preload_content=False,
            # No total limit: the server ends the watch after `timeout`; a read silence longer than that
            # means the connection died without a FIN.
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=self._settings.request_timeout,
                sock_read=timeout + self._settings.request_timeout,
            ),
        )
        events = 0
        async with response:
            if response.status == 410:
                raise _Gone(await _status_message(response))
            if response.status != 200:
                raise _ApiError(response.status, await _status_message(response))
            # Events are newline-delimited JSON; split them ourselves so one large object is not bounded
            # by the stream reader's line limit.
            buffer = bytearray()
            async for chunk in response.content.iter_any():
                buffer.extend(chunk)
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if line.strip():
                        self._apply(orjson.loads(line))
                        events += 1
        return events

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code, message = obj.get("code"), str(obj.get("message", ""))
            if code == 410:
                raise _Gone(message)
            raise _ApiError(int(code or 0), message)
        metadata = obj.get("metadata") or {}
        if metadata.get("resourceVersion"):
            self.resource_version = str(metadata["resourceVersion"])
        if kind == "BOOKMARK":
            return
        name = str(metadata.get("name", ""))
        if kind == "DELETED":
            self.slices.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.slices[name] = self._specs(obj)
        else:
            raise ValueError(f"malformed watch event of type {kind!r}")
        self._on_change()


class KubernetesDiscovery:
    """Keeps the registry equal to the endpoints of the selected EndpointSlices in every namespace."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self._settings = settings
        self._api_key = settings.api_key()

    async def run(self, registry: Registry) -> None:
        client = await self._connect()
        published: list[BackendSpec] | None = None
        watches: list[_NamespaceWatch] = []

        def publish() -> None:
            nonlocal published
            specs = merge(group for watch in watches for group in watch.slices.values())
            if specs != published:  # bookmarks and no-op updates do not churn the registry
                registry.reconcile(specs)
                published = specs

        try:
            api = DiscoveryV1Api(client)
            watches.extend(
                _NamespaceWatch(api, namespace, self._settings, self._api_key, publish)
                for namespace in dict.fromkeys(self._settings.namespaces)
            )
            async with asyncio.TaskGroup() as group:
                for watch in watches:
                    group.create_task(watch.run(), name=f"endpointslices-{watch.namespace}")
        finally:
            await client.close()

    async def _connect(self) -> ApiClient:
        """An API client from the pod's service account, or from a kubeconfig; retried until it works,
        so a missing file or token shows in the log instead of ending discovery."""
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        while True:
            configuration = Configuration()
            try:
                if self._settings.kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
                    load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                else:
                    await load_kube_config(
                        config_file=self._settings.kubeconfig,
                        context=self._settings.context,
                        client_configuration=configuration,
                        persist_config=False,
                    )
            except Exception as exc:  # the loaders raise many unrelated types for one cause: no config
                delay = backoff.next()
                log.error("cannot load Kubernetes client configuration (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            return ApiClient(configuration)
