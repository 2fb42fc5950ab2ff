"""A failed GPU (XID 79, fake NVML) takes its replicas out of service and the node out of readiness.

The node runs in this process (uvicorn on a free port) so the fake NVML backend can be driven directly;
the engines are real mock-engine processes pinned, on paper, to one GPU each.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.capacity.capacity_support import FAST_HEALTH, chat_body, paced_model
from tests.support.worker_process import eventually, serving
from worker.config import NodeConfig, Settings
from worker.gpu import FakeNvmlBackend, GpuMonitor
from worker.node import WorkerNode

ON_GPU0 = "acme/on-gpu0"
ON_GPU1 = "acme/on-gpu1"


@contextlib.asynccontextmanager
async def serving_node(node: WorkerNode) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(node.app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
def node(tmp_path) -> WorkerNode:
    config = NodeConfig.model_validate({
        "worker": {"id": "gpu-node", "engine_health": FAST_HEALTH},
        "models": [paced_model(ON_GPU0, step_ms=1.0), paced_model(ON_GPU1, step_ms=1.0)],
    })
    settings = Settings(auth=False, db_url=f"sqlite:///{tmp_path / 'ledger.db'}", admin_token=None)
    backend = FakeNvmlBackend.with_gpus(2)
    monitor = GpuMonitor(backend, interval_s=0.2, event_wait_ms=20)
    node = WorkerNode(config, settings, gpu_count=2, gpu_monitor=monitor)
    node.fake_nvml = backend  # type: ignore[attr-defined]
    return node


async def test_xid_79_makes_the_node_not_ready_and_shows_in_capacity(node: WorkerNode) -> None:
    async with serving_node(node) as client:
        assert await eventually(lambda: _status(client, "/health/ready", 200))
        capacity = (await client.get("/capacity")).json()
        assert capacity["gpu_monitoring"] == "available"
        gpus = {m["id"]: m["replicas"][0]["gpus"] for m in capacity["models"]}
        assert [g["index"] for g in gpus[ON_GPU0]] == [0] and [g["index"] for g in gpus[ON_GPU1]] == [1]
        assert all(g["health"] == "healthy" for m in gpus.values() for g in m)

        node.fake_nvml.inject_xid(0, 79)  # type: ignore[attr-defined]  GPU 0 fell off the bus

        assert await eventually(lambda: _status(client, "/health/ready", 503))
        ready = (await client.get("/health/ready")).json()
        assert ready["models"] == {ON_GPU0: ["unhealthy"], ON_GPU1: ["ready"]}
        capacity = (await client.get("/capacity")).json()
        by_id = {m["id"]: m for m in capacity["models"]}
        [lost] = by_id[ON_GPU0]["replicas"]
        assert lost["state"] == "unhealthy" and by_id[ON_GPU0]["state"] == "unavailable"
        assert lost["gpus"][0]["health"] == "failed" and lost["gpus"][0]["xid_last"] == 79
        assert "xid_79" in lost["gpus"][0]["reasons"]
        assert capacity["ready"] is False

        refused = await client.post("/v1/chat/completions", json=chat_body(ON_GPU0, 2))
        assert refused.status_code == 503 and refused.headers["retry-after"]
        served = await client.post("/v1/chat/completions", json=chat_body(ON_GPU1, 2))
        assert served.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert "worker_ready 0.0" in metrics
        assert f'worker_replica_state{{model="{ON_GPU0}",replica="acme-on-gpu0-0",state="unhealthy"}} 1.0' in metrics


async def test_admin_routes_are_off_without_an_admin_token(node: WorkerNode) -> None:
    async with serving_node(node) as client:
        response = await client.post("/admin/drain", headers={"authorization": "Bearer anything"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "admin_disabled"


async def _status(client: httpx.AsyncClient, path: str, expected: int) -> bool:
    return (await client.get(path)).status_code == expected
