"""The context length each running engine really has, read from its own `GET /v1/models` (`max_model_len`).

vLLM may start with a shorter window than models.yaml asks for (e.g. a model whose config allows less),
and routers must be shown the limit requests will actually meet. Each replica is read once per start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from worker.engines.replica import Replica, ReplicaState

logger = logging.getLogger(__name__)

_TRIES_PER_START = 3


@dataclass(frozen=True)
class _Reading:
    restarts: int  # the replica's restart count when it was read: a restart invalidates the reading
    limit: int | None
    tries: int

    def settled(self, restarts: int) -> bool:
        return self.restarts == restarts and (self.limit is not None or self.tries >= _TRIES_PER_START)


class EngineContextLengths:
    """Call it with a model id: the smallest limit its engines report, or None while none has been read."""

    def __init__(self, replicas_by_model: Mapping[str, Sequence[Replica]], *, interval_s: float = 5.0,
                 timeout_s: float = 5.0) -> None:
        self._replicas_by_model = replicas_by_model
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._readings: dict[str, _Reading] = {}
        self._task: asyncio.Task[None] | None = None

    def __call__(self, model_id: str) -> int | None:
        limits = []
        for replica in self._replicas_by_model.get(model_id, ()):
            reading = self._readings.get(replica.replica_id)
            if reading is not None and reading.limit is not None:
                limits.append(reading.limit)
        return min(limits) if limits else None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll_forever(), name="engine-context-lengths")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Read every ready replica not yet read since its last start."""
        for model_id, replicas in self._replicas_by_model.items():
            for replica in replicas:
                if replica.state is not ReplicaState.ready:
                    continue
                reading = self._readings.get(replica.replica_id)
                if reading is not None and reading.settled(replica.restarts):
                    continue
                restarts = replica.restarts
                tries = reading.tries + 1 if reading is not None and reading.restarts == restarts else 1
                limit = await self._read(replica, model_id)
                self._readings[replica.replica_id] = _Reading(restarts, limit, tries)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a listing detail must never stop the worker
                logger.exception("reading engine context lengths failed")
            await asyncio.sleep(self.interval_s)

    async def _read(self, replica: Replica, model_id: str) -> int | None:
        try:
            response = await replica.client.get("/v1/models", timeout=self.timeout_s)
            response.raise_for_status()
            return engine_context_length(response.json(), model_id)
        except (httpx.HTTPError, ValueError) as error:
            logger.debug("engine /v1/models unreadable", extra={"replica": replica.replica_id, "error": str(error)})
            return None


def engine_context_length(body: Any, model_id: str) -> int | None:
    """`max_model_len` of `model_id` in a vLLM-shaped model list (or of its only model, if the id differs)."""
    entries = body.get("data") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return None
    models = [entry for entry in entries if isinstance(entry, dict)]
    match = next((entry for entry in models if entry.get("id") == model_id), None)
    if match is None and len(models) == 1:
        match = models[0]
    value = match.get("max_model_len") if match is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
