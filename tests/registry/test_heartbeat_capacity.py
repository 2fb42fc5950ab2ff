"""What a registry learns from a worker's heartbeats, end to end on the mock engine: the predicted wait of
each model's queue, and each replica's prefix-cache hit rate (also in /capacity and /metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.capacity.capacity_support import FAST_HEALTH, metric_value
from tests.registry.receiver import Receiver, ReceiverServer
from tests.support.worker_process import (
    WorkerProcess,
    fast_mock_model,
    ready_or_stopped,
    start_worker,
    wait_until,
)

SESSIONS_MODEL = "acme/sessions"
SLOW_MODEL = "acme/slow"  # one batch slot, ~0.2 s a request: a burst queues in the worker


@pytest.fixture(scope="module")
def registry() -> Iterator[tuple[Receiver, str]]:
    receiver = Receiver()
    running = ReceiverServer(receiver).open()
    try:
        yield receiver, running.url
    finally:
        running.close()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, registry: tuple[Receiver, str]) -> Iterator[WorkerProcess]:
    sessions = fast_mock_model(SESSIONS_MODEL, replicas=2, routing={"policy": "cache_aware"},
                               engine_args={"max_model_len": 2048, "max_num_seqs": 8},
                               mock={"step_base_ms": 2.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0,
                                     "num_kv_blocks": 400, "block_size": 16})
    slow = fast_mock_model(SLOW_MODEL, engine_args={"max_model_len": 512, "max_num_seqs": 1},
                           admission={"ttft_objective_s": 60.0},
                           mock={"step_base_ms": 20.0, "step_per_seq_ms": 0.0, "prefill_per_token_ms": 0.0})
    config = {"worker": {"id": "heartbeat-capacity", "engine_health": FAST_HEALTH}, "models": [sessions, slow]}
    env = {"WORKER_REGISTRY_URL": registry[1], "WORKER_REGISTRY_HEARTBEAT_S": "0.1"}
    proc = ready_or_stopped(start_worker(tmp_path_factory.mktemp("heartbeat-capacity"), config, env=env))
    try:
        yield proc
    finally:
        proc.stop()


def _model(capacity: dict[str, Any], model_id: str) -> dict[str, Any]:
    return next(model for model in capacity["models"] if model["id"] == model_id)


async def test_heartbeats_carry_the_predicted_wait_of_a_queue(worker: WorkerProcess,
                                                             registry: tuple[Receiver, str]) -> None:
    receiver, _ = registry
    body = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60) as client:
        first = await client.post("/v1/chat/completions", json=body)  # the replicas' completion rate, measured
        assert first.status_code == 200, first.text
        burst = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(10)))
    assert [response.status_code for response in burst] == [200] * 10

    queued = [queue for call in receiver.of("heartbeat", 200)
              if (queue := _model(call.body["capacity"], SLOW_MODEL)["queue"])["depth"] > 0]
    assert queued, "no heartbeat was sent while requests queued"
    predicted = [queue["predicted_wait_s"] for queue in queued if queue["predicted_wait_s"] is not None]
    assert predicted and all(wait > 0 for wait in predicted)
    assert all(queue["ttft_objective_s"] == 60.0 for queue in queued)
    # The idle model's queue: nothing to wait for.
    idle = _model(receiver.of("heartbeat", 200)[-1].body["capacity"], SESSIONS_MODEL)["queue"]
    assert (idle["depth"], idle["predicted_wait_s"]) == (0, 0.0)


def _replica_counter(worker: WorkerProcess, name: str, replica: str) -> float:
    return metric_value(worker, name, model=SESSIONS_MODEL, replica=replica) or 0.0


def capacity_views(worker: WorkerProcess) -> dict[str, dict[str, Any]]:
    capacity = httpx.get(f"{worker.base_url}/capacity", timeout=10).json()
    return {view["replica"]: view for view in _model(capacity, SESSIONS_MODEL)["replicas"]}


async def test_each_replicas_prefix_cache_hit_rate_in_capacity_metrics_and_heartbeats(
        worker: WorkerProcess, registry: tuple[Receiver, str]) -> None:
    receiver, _ = registry
    system = " ".join(f"fact{i}" for i in range(300))
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    served = set()
    async with httpx.AsyncClient(base_url=worker.base_url, timeout=60) as client:
        for turn in range(4):
            messages.append({"role": "user", "content": f"question {turn}"})
            response = await client.post("/v1/chat/completions",
                                         json={"model": SESSIONS_MODEL, "messages": messages, "max_tokens": 4})
            assert response.status_code == 200, response.text
            served.add(response.headers["x-worker-replica"])
            messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
    (replica,) = served  # one session: one replica
    (idle,) = set(capacity_views(worker)) - served

    hits = _replica_counter(worker, "vllm:prefix_cache_hits_total", replica)
    queries = _replica_counter(worker, "vllm:prefix_cache_queries_total", replica)
    assert 0 < hits < queries  # turns 2-4 found most of their prompt cached, turn 1 nothing
    lifetime = round(hits / queries, 3)

    # Admission scrapes every 0.1 s: the worker's view catches up with the engine's counters.
    assert wait_until(lambda: capacity_views(worker)[replica]["prefix_cache_hit_rate_lifetime"] == lifetime, 10)
    views = capacity_views(worker)
    assert views[idle]["prefix_cache_hit_rate_lifetime"] is None  # it has looked nothing up
    assert metric_value(worker, "worker_replica_prefix_cache_hit_rate_lifetime", model=SESSIONS_MODEL,
                        replica=replica) == pytest.approx(hits / queries)
    assert metric_value(worker, "worker_replica_prefix_cache_hit_rate_lifetime", model=SESSIONS_MODEL,
                        replica=idle) is None

    def heartbeat_rate() -> float | None:
        last = receiver.of("heartbeat", 200)[-1].body["capacity"]
        view = next(v for v in _model(last, SESSIONS_MODEL)["replicas"] if v["replica"] == replica)
        return view["prefix_cache_hit_rate_lifetime"]

    assert wait_until(lambda: heartbeat_rate() == lifetime, 10)
