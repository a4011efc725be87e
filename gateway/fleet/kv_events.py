"""The KV event client: subscribes to every healthy backend's KV cache events and feeds the precise prefix index.

Per backend it finds the publishers (the backend's `GET /kv_event_sources`, with a wildcard host replaced by
the backend's own; or endpoints given in the configuration or by Kubernetes), and per publisher (one per
data-parallel rank) it runs one subscriber:

- On connecting it replays the publisher's buffer from sequence 0: a complete history means the engine's
  cache is known (it started empty); a history that no longer starts at 0 means it is not, and the index
  rebuilds that backend from the events that follow.
- It then applies batches in sequence order. A gap is filled from the replay socket (asking from the last
  applied batch, whose payload must match what was applied, so that a restarted engine is not mistaken for
  the same one); a gap the replay cannot fill is a loss; a sequence that goes back to an unknown payload is
  an engine that restarted.
- It never blocks the request path: all of this runs in its own tasks, and ZeroMQ reconnects on its own
  (with its reconnect back-off) when a publisher goes away and comes back.

A backend that turns unhealthy is unsubscribed and its cache marked unknown; it is subscribed afresh when it
comes back. What it holds stays bounded by the index (kv_index.py), and what this client buffers is bounded
by ZeroMQ's high-water mark and the replay's own size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import zmq
import zmq.asyncio

from gateway.fleet.kv_protocol import (
    END_SEQ,
    BadEvents,
    KvEvent,
    KvSource,
    decode_batch,
    decode_seq,
    encode_seq,
    parse_sources,
)
from gateway.fleet.registry import Backend, Registry
from gateway.metrics import KV_GAP_OUTCOMES, Metrics
from gateway.settings import KvEventSettings

log = logging.getLogger("switchyard.kv_events")

RECENT = 4096  # applied batches remembered (sequence -> payload hash), to tell a duplicate from a restart


class KvEventSink(Protocol):
    """Where the events go (routing's precise prefix index)."""

    def expect(self, url: str, ranks: Iterable[int]) -> None: ...
    def apply(self, url: str, rank: int, events: Iterable[KvEvent]) -> int: ...
    def synced(self, url: str, rank: int) -> None: ...
    def restarted(self, url: str, rank: int) -> None: ...
    def lost(self, url: str) -> None: ...
    def unknown(self, url: str) -> None: ...
    def forget(self, url: str) -> None: ...
    def set_capacity(self, url: str, blocks: int | None) -> None: ...


@dataclass(eq=False)
class SourceStatus:
    source: KvSource
    connected: bool = False
    last_seq: int | None = None
    events: int = 0
    lag: float | None = None


@dataclass(eq=False)
class BackendEvents:
    """One backend's subscription: its task and what the fleet view shows of it."""

    url: str
    task: asyncio.Task[None] | None = None
    sources: list[SourceStatus] = field(default_factory=list)
    error: str | None = None  # why it has no sources, if it has none


class KvEventHub:
    def __init__(self, registry: Registry, sink: KvEventSink, metrics: Metrics, settings: KvEventSettings) -> None:
        self._registry = registry
        self._sink = sink
        self._metrics = metrics
        self._settings = settings
        self._subscriptions: dict[str, BackendEvents] = {}
        self._context: zmq.asyncio.Context | None = None
        self._session: aiohttp.ClientSession | None = None

    def subscription(self, url: str) -> BackendEvents | None:
        return self._subscriptions.get(url)

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Until cancelled (the app's lifespan owns it); `session` asks backends for their event sources."""
        self._session = session
        context = self._context = zmq.asyncio.Context()
        try:
            while True:
                self._reconcile()
                await asyncio.sleep(self._settings.reconcile_interval)
        finally:
            for subscription in self._subscriptions.values():
                if subscription.task is not None:
                    subscription.task.cancel()
            await asyncio.gather(
                *(s.task for s in self._subscriptions.values() if s.task is not None), return_exceptions=True
            )
            context.destroy(linger=0)

    def _reconcile(self) -> None:
        backends = {backend.url: backend for backend in self._registry.backends}
        for url in list(self._subscriptions):
            backend = backends.get(url)
            if backend is None or not backend.healthy:
                subscription = self._subscriptions.pop(url)
                if subscription.task is not None:
                    subscription.task.cancel()
                with contextlib.suppress(KeyError):  # its last lag would read as a healthy event stream
                    self._metrics.kv_event_lag.remove(url)
                if backend is None:
                    self._sink.forget(url)
                else:
                    self._sink.unknown(url)  # its engine may be restarting: nothing it said still holds
        for url, backend in backends.items():
            if backend.engine is not None:
                self._sink.set_capacity(url, backend.engine.num_blocks)
            if backend.healthy and url not in self._subscriptions:
                subscription = BackendEvents(url)
                subscription.task = asyncio.create_task(self._subscribe(backend, subscription), name=f"kv {url}")
                self._subscriptions[url] = subscription

    async def _subscribe(self, backend: Backend, subscription: BackendEvents) -> None:
        delay = self._settings.backoff_initial
        while True:
            sources = list(backend.kv_sources) or await self._discover(backend, subscription)
            if sources:
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._settings.backoff_max)
        subscription.error = None
        subscription.sources = [SourceStatus(source) for source in sources]
        self._sink.expect(backend.url, [source.rank for source in sources])
        self._metrics.kv_events.labels(backend.url)  # label values known in advance: exported from 0
        for outcome in KV_GAP_OUTCOMES:
            self._metrics.kv_event_gaps.labels(backend.url, outcome)
        await asyncio.gather(*(self._follow(backend.url, status) for status in subscription.sources))

    async def _discover(self, backend: Backend, subscription: BackendEvents) -> list[KvSource]:
        host = _host(backend.url)
        assert self._session is not None
        try:
            async with self._session.get(
                f"{backend.url}/kv_event_sources", timeout=aiohttp.ClientTimeout(total=self._settings.timeout)
            ) as response:
                if response.status != 200:
                    subscription.error = f"/kv_event_sources answered {response.status}"
                    return []
                sources = parse_sources(await response.json(content_type=None), host)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            subscription.error = f"/kv_event_sources failed: {exc.__class__.__name__}"
            return []
        if not sources:
            subscription.error = "the backend publishes no KV events"
        return sources

    async def _follow(self, url: str, status: SourceStatus) -> None:
        """Keep one publisher's events applied, in order, for as long as the backend is subscribed."""
        assert self._context is not None
        source = status.source
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._settings.receive_hwm)
        sub.setsockopt(zmq.RECONNECT_IVL, int(self._settings.backoff_initial * 1000))
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, int(self._settings.backoff_max * 1000))
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt_string(zmq.SUBSCRIBE, source.topic)
        sub.connect(source.endpoint)
        follower = _Follower(self, url, status)
        try:
            await asyncio.sleep(0.05)  # the subscription reaches the publisher before the replay is asked for
            await follower.catch_up()
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                await follower.receive(frames[1], frames[2])
        finally:
            sub.close(linger=0)

    async def replay(self, source: KvSource, start: int) -> list[tuple[int, bytes]] | None:
        """Every batch the publisher still holds from `start` on; None without a replay socket or an answer."""
        if source.replay_endpoint is None or self._context is None:
            return None
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(source.replay_endpoint)
        batches: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(self._settings.timeout):
                await dealer.send_multipart([b"", encode_seq(start)])
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 4:
                        continue
                    _, _, seq, payload = frames
                    if seq == END_SEQ:
                        return batches
                    batches.append((decode_seq(seq), payload))
        except (TimeoutError, BadEvents):
            return None
        finally:
            dealer.close(linger=0)

    def applied(self, url: str, status: SourceStatus, payload: bytes) -> None:
        """Decode one batch and hand it to the index."""
        try:
            batch = decode_batch(payload)
        except BadEvents as exc:
            log.warning("backend %s sent a KV event batch this gateway cannot read: %s", url, exc)
            return
        count = self._sink.apply(url, status.source.rank, batch.events)
        status.events += count
        status.lag = max(time.time() - batch.ts, 0.0)
        self._metrics.kv_events.labels(url).inc(count)
        self._metrics.kv_event_lag.labels(url).set(status.lag)

    def gap(self, url: str, outcome: str) -> None:
        self._metrics.kv_event_gaps.labels(url, outcome).inc()

    @property
    def sink(self) -> KvEventSink:
        return self._sink


class _Follower:
    """The sequence bookkeeping of one publisher: what was applied, and how to close a gap."""

    def __init__(self, hub: KvEventHub, url: str, status: SourceStatus) -> None:
        self._hub = hub
        self._url = url
        self._status = status
        self._recent: OrderedDict[int, int] = OrderedDict()  # seq -> hash of its payload

    @property
    def _last(self) -> int | None:
        return self._status.last_seq

    def _apply(self, seq: int, payload: bytes) -> None:
        self._hub.applied(self._url, self._status, payload)
        self._status.last_seq = seq
        self._recent[seq] = hash(payload)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    async def catch_up(self) -> None:
        """Replay from the start: a full history makes the cache known; a partial one starts a rebuild."""
        status = self._status
        batches = await self._hub.replay(status.source, 0)
        sink = self._hub.sink
        if batches is None:
            status.connected = True
            return  # no history to read: the first live batch decides
        status.connected = True
        if batches and batches[0][0] != 0:
            self._hub.gap(self._url, "lost")
            sink.lost(self._url)
        else:
            sink.synced(self._url, status.source.rank)
        for seq, payload in batches:
            self._apply(seq, payload)

    async def receive(self, seq_frame: bytes, payload: bytes) -> None:
        try:
            seq = decode_seq(seq_frame)
        except BadEvents:
            return
        last = self._last
        sink = self._hub.sink
        if last is None:
            if seq == 0:
                sink.synced(self._url, self._status.source.rank)
            else:  # joined late with no history read: what came before is unknown
                self._hub.gap(self._url, "lost")
                sink.lost(self._url)
            self._apply(seq, payload)
            return
        if seq == last + 1:
            self._apply(seq, payload)
            return
        if seq <= last:
            if self._recent.get(seq) == hash(payload):
                return  # a batch the replay already applied
            self._restarted()
            await self._start_over(seq, payload)
            return
        await self._fill(last, seq, payload)

    def _restarted(self) -> None:
        self._hub.gap(self._url, "restart")
        self._hub.sink.restarted(self._url, self._status.source.rank)
        self._status.last_seq = None
        self._recent.clear()

    async def _start_over(self, seq: int, payload: bytes) -> None:
        """A new engine behind the same address: read its history from 0, then this batch."""
        await self.catch_up()
        last = self._last
        if last is None or seq == last + 1:
            await self.receive(encode_seq(seq), payload)
        elif seq > last + 1:
            await self._fill(last, seq, payload)

    async def _fill(self, last: int, seq: int, payload: bytes) -> None:
        """Batches last+1 .. seq-1 are missing: ask the replay, starting at `last` to check it is the same engine."""
        batches = await self._hub.replay(self._status.source, last)
        sink = self._hub.sink
        if batches is None or not batches or batches[0][0] > last:
            self._hub.gap(self._url, "lost")
            sink.lost(self._url)
        elif batches[0][0] < last or hash(batches[0][1]) != self._recent.get(last):
            self._restarted()
            await self._start_over(seq, payload)
            return
        else:
            self._hub.gap(self._url, "filled")
        for number, data in batches or ():
            if self._last is None or number > self._last:
                self._apply(number, data)
        if self._last is None or seq > self._last:
            self._apply(seq, payload)


def _host(url: str) -> str:
    return urlsplit(url).hostname or "127.0.0.1"
