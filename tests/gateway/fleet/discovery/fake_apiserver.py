"""A local HTTP server that speaks the Kubernetes list/watch protocol for discovery.k8s.io/v1 EndpointSlices.

It keeps objects and an event history keyed by a resourceVersion counter, as the API server does:
- `GET .../namespaces/NS/endpointslices?labelSelector=..` answers an EndpointSliceList whose
  metadata.resourceVersion is the current version;
- `?watch=true&resourceVersion=RV` answers a chunked stream of newline-delimited watch events: first the
  history after RV, then live changes; an RV older than the compacted history gets an ERROR event carrying
  a 410 Status, as a real server sends it.
Tests drive it with `apply`/`delete`, and break it with `compact`, `expire_watches`, `drop_watches`, `fail_next`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Obj = dict[str, Any]
WORKER_LABELS = {"app.kubernetes.io/part-of": "switchyard", "app.kubernetes.io/component": "worker"}
_DROP = object()


def endpoint_slice(
    name: str,
    namespace: str,
    endpoints: list[tuple[str, bool, bool]],
    *,
    port: int = 8000,
    port_name: str = "http",
    labels: dict[str, str] | None = None,
    address_type: str = "IPv4",
) -> Obj:
    """An EndpointSlice as the endpointslice controller writes it; endpoints are (ip, ready, terminating)."""
    service = name.rsplit("-", 1)[0]
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "uid": f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
            "generation": 1,
            "creationTimestamp": "2026-11-22T10:00:00Z",
            "labels": {
                **(WORKER_LABELS if labels is None else labels),
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": "11111111-2222-4333-8444-555555555555",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": address_type,
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
                "nodeName": "gpu-node-1",
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"{service}-{index}", "uid": "u"},
            }
            for index, (ip, ready, terminating) in enumerate(endpoints)
        ],
        "ports": [{"name": port_name, "protocol": "TCP", "port": port}],
    }


def _matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _status_410() -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version: 1 (2)",
        "reason": "Expired",
        "code": 410,
    }


@dataclass(eq=False)  # identity hash: watchers live in a set
class _Watcher:
    namespace: str
    selector: str
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    def __init__(self) -> None:
        self._versions = itertools.count(100)
        self.version = next(self._versions)
        self.objects: dict[tuple[str, str], Obj] = {}
        self.history: list[tuple[int, str, Obj]] = []  # (version, event type, object)
        self.compacted = 0  # watches from a version below this get 410
        self.requests: list[tuple[str, dict[str, str], str | None]] = []  # (path, query, authorization)
        self._watchers: set[_Watcher] = set()
        self._failures: list[int] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- driving the state ----------------------------------------------------------------------------

    def apply(self, obj: Obj) -> None:
        """Create or replace an object (ADDED or MODIFIED)."""
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        kind = "MODIFIED" if key in self.objects else "ADDED"
        self._record(kind, key, copy.deepcopy(obj))

    def delete(self, namespace: str, name: str) -> None:
        self._record("DELETED", (namespace, name), self.objects[(namespace, name)])

    def _record(self, kind: str, key: tuple[str, str], obj: Obj) -> None:
        self.version = next(self._versions)
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            del self.objects[key]
        else:
            self.objects[key] = obj
        self.history.append((self.version, kind, obj))
        for watcher in self._watchers:
            if self._selected(watcher, obj):
                watcher.queue.put_nowait({"type": kind, "object": obj})

    def compact(self) -> None:
        """Forget the history: any watch from an older version now gets 410 Gone."""
        self.history.clear()
        self.compacted = self.version

    def expire_watches(self) -> None:
        """Send an ERROR 410 event down every open watch, then end it."""
        for watcher in self._watchers:
            watcher.queue.put_nowait({"type": "ERROR", "object": _status_410()})
            watcher.queue.put_nowait(None)

    def drop_watches(self) -> None:
        """Cut every open watch connection without finishing the chunked body."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_DROP)

    def send_raw(self, line: bytes) -> None:
        """Write these bytes down every open watch as they are (e.g. a malformed event)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(line)

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses (a Status body), in order."""
        self._failures.extend(statuses)

    @property
    def watching(self) -> int:
        return len(self._watchers)

    def _selected(self, watcher: _Watcher, obj: Obj) -> bool:
        metadata = obj["metadata"]
        return metadata["namespace"] == watcher.namespace and _matches(watcher.selector, metadata["labels"])

    # -- the protocol ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        query = dict(request.query)
        self.requests.append((request.path, query, request.headers.get("Authorization")))
        if self._failures:
            status = self._failures.pop(0)
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status, "message": "boom"}
            return web.json_response(body, status=status)
        selector = query.get("labelSelector", "")
        if query.get("watch", "").lower() in ("true", "1"):  # Go's ParseBool: the client sends "True"
            return await self._watch(request, _Watcher(namespace, selector), int(query["resourceVersion"]))
        items = [
            obj
            for (ns, _), obj in sorted(self.objects.items())
            if ns == namespace and _matches(selector, obj["metadata"]["labels"])
        ]
        body = {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.version)},
            "items": items,
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _watch(self, request: web.Request, watcher: _Watcher, since: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if since < self.compacted:
            await response.write(orjson.dumps({"type": "ERROR", "object": _status_410()}) + b"\n")
            await response.write_eof()
            return response
        for version, kind, obj in list(self.history):
            if version > since and self._selected(watcher, obj):
                watcher.queue.put_nowait({"type": kind, "object": obj})
        self._watchers.add(watcher)
        try:
            while True:
                event = await watcher.queue.get()
                if event is None:
                    break
                if event is _DROP:
                    assert request.transport is not None
                    request.transport.abort()  # no terminating chunk: the client sees a broken body
                    return response
                await response.write(event if isinstance(event, bytes) else orjson.dumps(event) + b"\n")
            await response.write_eof()
        finally:
            self._watchers.discard(watcher)
        return response


@contextlib.asynccontextmanager
async def running() -> Any:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
