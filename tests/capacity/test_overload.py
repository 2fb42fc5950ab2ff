"""Overload: requests the engine cannot start within the first-token objective get a 429 before any byte;
the ones it can wait in the worker's queue and finish."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.capacity.capacity_support import (
    assert_finished_normally,
    chat_body,
    metric_value,
    paced_model,
    worker_config,
)
from tests.support.worker_process import WorkerProcess, start_worker

MODEL = "acme/busy"
MAX_IN_FLIGHT = 5  # max_num_seqs 4 + a queue allowance of 1
OBJECTIVE_S = 1.0


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> WorkerProcess:
    model = paced_model(MODEL, step_ms=20.0, max_num_seqs=4,
                        admission={"queue_allowance": 1, "ttft_objective_s": OBJECTIVE_S})
    proc = start_worker(tmp_path_factory.mktemp("overload"), worker_config(model))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


async def _stream(client: httpx.AsyncClient, opened: asyncio.Queue) -> tuple[httpx.Response, list[str]]:
    # 120 tokens at 20 ms a step: every admitted stream stays open for seconds.
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(MODEL, 120, stream=True)) as response:
        await opened.put(response.status_code)
        if response.status_code != 200:
            await response.aread()
            return response, []
        return response, [line async for line in response.aiter_lines()]


async def test_overload_is_refused_before_any_byte_while_admitted_requests_complete(worker: WorkerProcess) -> None:
    # 16 streams of 120 tokens at 20 ms a step, 5 at a time: ~8 s of work against a 1 s objective.
    offered = 16
    opened: asyncio.Queue = asyncio.Queue()
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=64)) as client:
        tasks = [asyncio.create_task(_stream(client, opened)) for _ in range(offered)]
        statuses = [await opened.get() for _ in range(offered)]
        # Every request has its answer's head; the admitted streams are still generating.
        capacity = (await client.get("/capacity")).json()
        results = await asyncio.gather(*tasks)

    admitted = [(r, lines) for r, lines in results if r.status_code == 200]
    refused = [r for r, _ in results if r.status_code != 200]
    assert sorted(set(statuses)) == [200, 429]
    assert MAX_IN_FLIGHT <= len(admitted) < offered
    for response in refused:
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
    for response, lines in admitted:
        assert_finished_normally(lines)
        assert response.headers["x-worker-replica"] == "acme-busy-0"
        assert int(response.headers["x-worker-in-flight"]) >= 1
        assert {"x-worker-queue-depth", "x-worker-running", "x-worker-kv-cache-usage",
                "x-worker-queued"} <= set(response.headers)

    [replica] = capacity["models"][0]["replicas"]
    assert replica["state"] == "saturated"
    assert replica["in_flight"] == MAX_IN_FLIGHT
    assert replica["max_in_flight"] == MAX_IN_FLIGHT
    assert capacity["models"][0]["queue"]["ttft_objective_s"] == OBJECTIVE_S
    reasons = [metric_value(worker, "worker_admission_rejections_total", model=MODEL, reason=reason) or 0
               for reason in ("predicted_wait", "queue_deadline", "queue_full")]
    assert sum(reasons) == len(refused)


def test_after_the_burst_the_replica_takes_work_again(worker: WorkerProcess) -> None:
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", json=chat_body(MODEL, 3), timeout=30)
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
