"""Sticky routing for vLLM's Responses API: a response lives in the memory of the server that made it.

Requests naming `previous_response_id`, and GET / cancel of a response, must reach that server. The
gateway remembers the ids it saw pass (a bounded LRU); an id it has not seen (made through another
gateway replica, or before a restart) is found by asking each candidate backend, so replicas need no
shared state.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Sequence

import aiohttp

from gateway.fleet.registry import Backend

_RESPONSE_ID = re.compile(rb'"id":\s*"(resp_[A-Za-z0-9_-]{1,200})"')


class ResponseDirectory:
    def __init__(self, capacity: int = 100_000, probe_timeout: float = 2.0) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()  # response id -> backend url
        self._capacity = capacity
        self._timeout = aiohttp.ClientTimeout(total=probe_timeout)

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
        self, response_id: str, candidates: Sequence[Backend], session: aiohttp.ClientSession
    ) -> Backend | None:
        owner = self._owners.get(response_id)
        if owner is not None:
            for backend in candidates:
                if backend.url == owner:
                    return backend
        found = await self._probe(response_id, candidates, session)
        if found is not None:
            self._remember(response_id, found.url)
        return found

    async def _probe(
        self, response_id: str, candidates: Sequence[Backend], session: aiohttp.ClientSession
    ) -> Backend | None:
        async def owns(backend: Backend) -> bool:
            headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
            try:
                async with session.get(
                    f"{backend.url}/v1/responses/{response_id}", headers=headers, timeout=self._timeout
                ) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        answers = await asyncio.gather(*(owns(backend) for backend in candidates))
        return next((backend for backend, yes in zip(candidates, answers, strict=True) if yes), None)
