"""Publishes one server's KV events over ZMQ exactly as vLLM's `ZmqEventPublisher` does.

- PUB socket: each batch is the multipart message `[topic, seq, msgpack(KVEventBatch)]`, seq an 8-byte big-endian
  counter from 0. The endpoint is bound when it has a wildcard host (`*`, `::`) or is ipc/inproc, else connected
  (to a subscriber that binds), as in vLLM. `tcp://*:0` binds the server's --host (or $VLLM_HOST_IP) on a free
  port; every bound port-0 endpoint is reported with its real port in /kv_event_sources.
- ROUTER replay socket: a request `[b"", start_seq]` (what a DEALER sends) is answered with every buffered batch
  from that sequence number on, `[b"", topic, seq, payload]` each, then the end marker `[b"", b"", -1, b""]`
  (seq -1 as 8 signed bytes). The buffer holds the last `buffer_steps` batches.

Off the engine's critical path: the driver hands over a step's events with `loop.call_soon`, after the
step's tokens went to their streams; encoding is msgspec's, and the sends never block (PUB drops above its
high-water mark, as ZMQ does for vLLM; a replay of a long buffer yields to the event loop as it goes).
Memory is bounded by `buffer_steps` batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time

import msgspec
import zmq
import zmq.asyncio

from worker.sim.errors import ConfigError
from worker.sim.kv_events import KVEvent, KVEventBatch, KVEventsSettings

END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_YIELD_EVERY = 256  # replayed batches between two yields to the event loop
log = logging.getLogger("worker.sim")


def _is_bind_endpoint(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def _bind(sock: zmq.Socket[bytes], endpoint: str, host: str) -> str:
    """Bind and return the endpoint to report (a port-0 one with its real port)."""
    if endpoint == "tcp://*:0":
        ip = os.environ.get("VLLM_HOST_IP") or host
        if ip in ("0.0.0.0", "::", ""):
            raise ConfigError("--kv-events-config: tcp://*:0 needs a node IP; set VLLM_HOST_IP (or --host)")
        endpoint = f"tcp://[{ip}]:0" if ":" in ip else f"tcp://{ip}:0"
    if "[" in endpoint or "::" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"--kv-events-config: cannot bind {endpoint}: {exc}") from None
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint


class KVEventPublisher:
    """The PUB and replay sockets of one simulated server. `open()` binds (before serving, so a busy
    port is a clear startup error), `start()` runs the replay responder, `close()` ends both."""

    def __init__(self, settings: KVEventsSettings, host: str) -> None:
        self.settings = settings
        self._host = host
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self._async_replay: zmq.asyncio.Socket | None = None  # the same socket, for awaiting requests
        self._replay_task: asyncio.Task[None] | None = None
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=settings.buffer_steps)
        self._encoder = msgspec.msgpack.Encoder()
        self._topic = settings.topic.encode()
        self._seq = 0
        self.resolved = settings  # with the endpoints as bound

    @property
    def next_seq(self) -> int:
        return self._seq

    def open(self) -> None:
        if self._pub is not None:
            return
        s = self.settings
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(s.hwm)
        try:
            if _is_bind_endpoint(s.endpoint):
                endpoint = _bind(pub, s.endpoint, self._host)
            else:
                endpoint = s.endpoint
                pub.connect(endpoint)
            replay_endpoint = None
            if s.replay_endpoint is not None:
                replay = self._ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 0)
                self._replay = replay
                replay_endpoint = _bind(replay, s.replay_endpoint, self._host)
        except BaseException:
            pub.close()
            if self._replay is not None:
                self._replay.close()
                self._replay = None
            raise
        self._pub = pub
        self.resolved = s.replace(endpoint=endpoint, replay_endpoint=replay_endpoint)

    def start(self) -> None:
        """Start answering replay requests (in the running event loop)."""
        self.open()
        if self._replay is not None and self._replay_task is None:
            self._async_replay = zmq.asyncio.Socket.from_socket(self._replay)
            self._replay_task = asyncio.create_task(self._serve_replay(self._async_replay), name="sim-kv-replay")

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
            self._replay_task = None
        if self._async_replay is not None:
            self._async_replay.close(linger=0)  # closes self._replay too
        elif self._replay is not None:
            self._replay.close(linger=0)
        if self._pub is not None:
            self._pub.close(linger=0)
        self._pub = self._replay = self._async_replay = None

    def publish(self, events: list[KVEvent]) -> None:
        """Send one engine step's events as one batch (never blocks)."""
        if self._pub is None or not events:
            return
        seq = self._seq
        self._seq += 1
        payload = self._encoder.encode(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        with contextlib.suppress(zmq.Again):  # above the high-water mark: dropped, as PUB does; replay has it
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        self._buffer.append((seq, payload))

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid KV event replay request: %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            sent = 0
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await router.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
                    sent += 1
                    if sent % REPLAY_YIELD_EVERY == 0:
                        await asyncio.sleep(0)
            await router.send_multipart((client, b"", b"", END_SEQ, b""))
