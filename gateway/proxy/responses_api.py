"""Sticky routing for vLLM's Responses API: a response lives in the memory of the server that made it.

Requests naming `previous_response_id`, and GET / cancel of a response, must reach that server. The
gateway remembers the ids it saw pass (a bounded LRU); an id it has not seen (made through another
gateway replica, or before a restart) is found by asking each candidate backend, so replicas need no
shared state. The questions go through the proxy's own upstream pool, like the requests they route.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Sequence
from urllib.parse import quote

from gateway.errors import UpstreamError
from gateway.fleet.registry import Backend
from gateway.proxy.upstream import UpstreamPool

_RESPONSE_ID = re.compile(rb'"id":\s*"(resp_[A-Za-z0-9_-]{1,200})"')


class ResponseDirectory:
    def __init__(self, pool: UpstreamPool, capacity: int = 100_000, probe_timeout: float = 2.0) -> None:
        self._pool = pool
        self._owners: OrderedDict[str, str] = OrderedDict()  # response id -> backend url
        self._capacity = capacity
        self._timeout = probe_timeout

    def learn(self, first_chunk: bytes, backend: Backend) -> None:
        """Remember the id in the first bytes of a /v1/responses answer (JSON or the response.created event)."""
        match = _RESPONSE_ID.search(first_chunk)
        if match is not None:
            self._remember(match.group(1).decode(), backend.url)

    def _remember(self, response_id: str, url: str) -> None:
        self._owners[response_id] = url
        self._owners.move_to_end(response_id)
        if len(self._owners) > self._capacity:
            self._owners.popitem(last=False)

    async def locate(self, response_id: str, candidates: Sequence[Backend]) -> Backend | None:
        owner = self._owners.get(response_id)
        if owner is not None:
            for backend in candidates:
                if backend.url == owner:
                    return backend
        found = await self._probe(response_id, candidates)
        if found is not None:
            self._remember(response_id, found.url)
        return found

    async def _probe(self, response_id: str, candidates: Sequence[Backend]) -> Backend | None:
        # The id comes from the client's URL, decoded: quoted again, it cannot break the request line.
        target = b"/v1/responses/" + quote(response_id, safe="").encode()

        async def owns(backend: Backend) -> bool:
            headers = [(b"authorization", b"Bearer " + backend.api_key.encode())] if backend.api_key else []
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._pool.request(backend.url, b"GET", target, headers, b"", self._timeout)
                    try:
                        while await response.readany():  # read to the end, so the connection is kept
                            pass
                    finally:
                        response.close()
            except (UpstreamError, TimeoutError):
                return False
            return response.status == 200

        answers = await asyncio.gather(*(owns(backend) for backend in candidates))
        return next((backend for backend, yes in zip(candidates, answers, strict=True) if yes), None)
