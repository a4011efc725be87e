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
from collections.abc import Callable, Sequence
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

    async def locate(
        self, response_id: str, candidates: Sequence[Backend], out_of_service: Callable[[str], bool]
    ) -> tuple[Backend | None, bool]:
        """The candidate holding the response, or None; and, when None, whether it may still exist out of reach:
        the server remembered as its owner is in the fleet but takes no requests now (`out_of_service`), or a
        candidate could not be asked. The caller answers 503 then, not 404."""
        owner = self._owners.get(response_id)
        if owner is not None:
            for backend in candidates:
                if backend.url == owner:
                    return backend, False
        found, unasked = await self._probe(response_id, candidates)
        if found is not None:
            self._remember(response_id, found.url)
            return found, False
        return None, unasked or (owner is not None and out_of_service(owner))

    async def _probe(self, response_id: str, candidates: Sequence[Backend]) -> tuple[Backend | None, bool]:
        """The candidate that answers 200 for the response, and whether some candidate could not be asked."""
        # The id comes from the client's URL, decoded: quoted again, it cannot break the request line.
        target = b"/v1/responses/" + quote(response_id, safe="").encode()

        async def owns(backend: Backend) -> bool | None:
            """True or False as the backend answers; None when it could not be asked."""
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
                return None
            if response.status >= 500:
                return None  # it could not say
            return response.status == 200

        answers = await asyncio.gather(*(owns(backend) for backend in candidates))
        found = next((backend for backend, yes in zip(candidates, answers, strict=True) if yes), None)
        return found, None in answers
