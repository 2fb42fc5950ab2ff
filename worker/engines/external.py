"""An OpenAI-compatible server the worker does not own: only proxied, never started or stopped."""

from __future__ import annotations

import asyncio

from worker.engines.base import Engine, EngineExited, ReplicaSpec


class ExternalEngine(Engine):
    kind = "external"

    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self._url = spec.model.source.rstrip("/")

    @property
    def base_url(self) -> str:
        return self._url.removesuffix("/v1")

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> None:
        return None

    async def wait_exit(self) -> EngineExited:
        await asyncio.Event().wait()  # an external server never "exits" from the worker's point of view
        raise AssertionError("unreachable")

    async def stop(self, timeout_s: float | None = None) -> None:
        return None
