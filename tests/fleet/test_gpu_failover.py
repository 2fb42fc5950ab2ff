"""A worker that loses its GPU (XID 79) drops out of LiteLLM's picks; its replacement takes the traffic back.

The preferred worker runs in this process with a fake NVML backend, so the test can make its GPU fall off
the bus; its mock replica is pinned to that GPU. Requests that arrive after the failure are refused before
their first byte (503) and move to the backup, a `worker serve` process; a stream already running on the
GPU cannot move and must end with an error the client sees. A failed GPU stays failed (the node quarantines
its replicas for good), so recovery is what an operator does: a new node, with a healthy GPU, on the same
address.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fleet.fleet_support import (
    ADMIN_TOKEN,
    MODEL,
    PROMPT,
    QUIET_LITELLM,
    ask_mixed,
    ask_until_served_by,
    fleet_router,
    refusals,
    served_by,
    worker_config,
)
from tests.support.worker_process import WorkerProcess, eventually, free_port, serving, start_worker
from worker.config import NodeConfig, Settings
from worker.gpu import FakeNvmlBackend, GpuMonitor
from worker.node import WorkerNode

pytestmark = QUIET_LITELLM

ON_GPU, BACKUP = "worker-on-gpu", "worker-backup"


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = start_worker(tmp_path_factory.mktemp("backup"), worker_config(BACKUP, step_ms=2.0, max_num_seqs=32),
                          env={"WORKER_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def node_on_one_gpu(tmp_path: Path, nvml: FakeNvmlBackend) -> WorkerNode:
    config = NodeConfig.model_validate(worker_config(ON_GPU, step_ms=5.0, max_num_seqs=16))
    settings = Settings(auth=False, db_url=f"sqlite:///{tmp_path / 'ledger.db'}", admin_token=None)
    monitor = GpuMonitor(nvml, interval_s=0.2, event_wait_ms=20)
    return WorkerNode(config, settings, gpu_count=1, gpu_monitor=monitor)


async def _readiness_is(base_url: str, status: int) -> bool:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"{base_url}/health/ready")).status_code == status


async def test_gpu_failure_moves_traffic_to_the_backup_until_the_node_is_replaced(
        backup: WorkerProcess, tmp_path: Path) -> None:
    port = free_port()
    nvml = FakeNvmlBackend.with_gpus(1)
    async with serving(node_on_one_gpu(tmp_path, nvml).app, port) as on_gpu:
        assert await eventually(lambda: _readiness_is(on_gpu, 200))
        router = fleet_router([on_gpu, backup.base_url])
        assert served_by(await ask_mixed(router, 3)) == {ON_GPU}

        # A stream already running there cannot move once its first token is out: when the GPU falls off
        # the bus, it ends with the worker's error (LiteLLM raises it), not silently cut short.
        running = await router.acompletion(model=MODEL, messages=PROMPT, max_tokens=2000, stream=True)
        chunks = aiter(running)
        await anext(chunks)
        nvml.inject_xid(0, 79)
        with pytest.raises(openai.APIError, match="GPU 0 failed"):
            async for _ in chunks:
                pass
        assert await eventually(lambda: _readiness_is(on_gpu, 503))

        during = await ask_mixed(router, 6)
        assert all(answer.complete for answer in during), during
        assert served_by(during) == {BACKUP}
        assert await refusals(on_gpu, "unavailable") >= 1  # it said 503 and the router moved on

    # The operator replaces the node; the new one, on a healthy GPU, answers on the same address.
    async with serving(node_on_one_gpu(tmp_path, FakeNvmlBackend.with_gpus(1)).app, port) as replaced:
        assert await eventually(lambda: _readiness_is(replaced, 200))
        back = await ask_until_served_by(router, ON_GPU)
        assert all(answer.complete for answer in back)
        assert served_by(await ask_mixed(router, 3)) == {ON_GPU}
