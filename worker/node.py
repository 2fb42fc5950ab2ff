"""One worker node: the supervisor, the gateway and their services, wired together from configuration."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from worker import __version__
from worker.config import NodeConfig, Settings
from worker.engines.replica import ReplicaState
from worker.engines.supervisor import EngineSupervisor
from worker.gateway.access_log import AccessLog
from worker.gateway.app import create_app
from worker.gateway.gateway import Gateway

logger = logging.getLogger(__name__)


class WorkerNode:
    def __init__(self, config: NodeConfig, settings: Settings, *, gpu_count: int) -> None:
        self.config = config
        self.settings = settings
        self.started_at = int(time.time())
        self.supervisor = EngineSupervisor(config, settings, gpu_count=gpu_count)
        self.gateway = Gateway(config, self.supervisor, hooks=[AccessLog()])
        self.app: FastAPI = create_app(self.gateway, lifespan=self._lifespan,
                                       models_listing=self.models_listing, readiness=self.readiness)

    @asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        logger.info("worker starting", extra={"worker_id": self.config.worker.id, "version": __version__,
                                              "replicas": [r.replica_id for r in self.supervisor.replicas]})
        await self.supervisor.start()

    async def stop(self) -> None:
        logger.info("worker stopping", extra={"worker_id": self.config.worker.id})
        await self.supervisor.stop()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        models = {
            model_id: [r.state.value for r in replicas]
            for model_id, replicas in self.supervisor.by_model.items()
        }
        ok = all(any(r.state is ReplicaState.ready for r in replicas)
                 for replicas in self.supervisor.by_model.values())
        return ok, {"models": models}

    def models_listing(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model.id,
                    "object": "model",
                    "created": self.started_at,
                    "owned_by": self.config.worker.id,
                    "root": model.source,
                    "max_model_len": model.max_model_len,
                }
                for model in self.config.models
            ],
        }
