"""A running worker on the mock engine: its requests' GPU seconds reach the ledger, its replica's up-time the
database, and `GET /admin/economics` reports them; stopping it closes the replica's run."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.support.worker_process import fast_mock_model, ready_or_stopped, start_worker
from worker.billing.store import open_store
from worker.economics.queries import uptime_runs

ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"


async def test_a_worker_records_and_reports_its_economics(tmp_path: Path) -> None:
    config = {"worker": {"id": "econ-node", "gpu_hour_usd": "2.00"},
              "models": [fast_mock_model("acme/chat", gpus_per_replica=2)]}
    worker = ready_or_stopped(start_worker(tmp_path, config, env={"WORKER_ADMIN_TOKEN": ADMIN_TOKEN}))
    try:
        async with httpx.AsyncClient(base_url=worker.base_url, timeout=30) as client:
            for _ in range(3):
                answer = await client.post("/v1/chat/completions", json={
                    "model": "acme/chat", "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 8})
                assert answer.status_code == 200, answer.text
            response = await client.get("/admin/economics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 200, response.text
        (chat,) = response.json()["models"]
        assert chat["requests"] == 3 and chat["completion_tokens"] > 0
        assert chat["gpu_seconds"] > 0
        assert chat["gpu_hours_provisioned"] > 0  # the replica's 2 (simulated) GPUs, up to now
        assert chat["utilization"] > 0 and chat["gpu_hour_usd"] == "2.00"
        assert chat["break_even_usd_per_mtok"] is not None and chat["peak_tokens_per_gpu_hour"] > 0
    finally:
        assert worker.stop(signal.SIGTERM) == 0, worker.log()[-3000:]

    store = await open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        (run,) = await uptime_runs(store, 0.0, 1e12)
    finally:
        await store.close()
    assert (run.worker_id, run.replica_id, run.model, run.gpus) == ("econ-node", "acme-chat-0", "acme/chat", 2)
    assert run.ready_at is not None and run.stopped_at is not None and run.started_at <= run.ready_at <= run.stopped_at
