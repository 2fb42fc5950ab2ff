"""The live economics metrics: revenue and attributed GPU seconds per finished request, the configured
GPU-hour price, the GPUs the replicas hold and their busy GPU seconds."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.worker_process import WorkerProcess, fast_mock_model, ready_or_stopped, start_worker, wait_until
from worker.billing.pricing import charge_micro
from worker.config.loader import parse_node_config
from worker.engines.replica import ReplicaState
from worker.gateway.context import RequestContext, Usage
from worker.metrics import EconomicsCollector, GatewayMetrics

CHAT = "acme/chat"


def samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


def value(page: str, name: str, **labels: str) -> float:
    return samples(page).get((name, tuple(sorted(labels.items()))), 0.0)


def node_config(**worker: Any) -> Any:
    return parse_node_config({
        "worker": {"id": "w", **worker},
        "models": [fast_mock_model(CHAT, replicas=2, gpus_per_replica=2),
                   fast_mock_model("acme/other", pricing={"prompt_per_mtok": "0", "completion_per_mtok": "0"})],
    })


def finished(config: Any, usage: Usage | None, *, gpu_seconds: float | None, outcome: str = "ok",
             model: int = 0) -> RequestContext:
    ctx = RequestContext(request_id="r", endpoint="chat.completions", model=config.models[model], body={},
                         stream=False, client_wants_usage=False, headers={})
    ctx.status_code, ctx.usage, ctx.outcome, ctx.finish_reason = 200, usage, outcome, "length"
    ctx.gpu_seconds = gpu_seconds  # type: ignore[attr-defined]  (a field of the context once attribution lands)
    return ctx


def the_ledgers_charge(ctx: RequestContext) -> int:
    return charge_micro(ctx.model, ctx.endpoint, ctx.usage, ctx.finish_reason, ctx.outcome)


async def test_each_finished_request_adds_its_charge_and_gpu_seconds_to_its_model() -> None:
    config, registry = node_config(), CollectorRegistry()
    metrics = GatewayMetrics(registry, charge_micro=the_ledgers_charge)
    # 1000 prompt tokens at $1/M and 500 completion tokens at $2/M: $0.002 = 2000 micro-USD.
    await metrics.finalize(finished(config, Usage(prompt_tokens=1000, completion_tokens=500), gpu_seconds=0.25))
    await metrics.finalize(finished(config, Usage(prompt_tokens=3, completion_tokens=7), gpu_seconds=0.125))
    page = generate_latest(registry).decode()
    assert value(page, "worker_revenue_usd_total", model=CHAT) == pytest.approx((2000 + 17) / 1e6, abs=1e-12)
    assert value(page, "worker_gpu_seconds_attributed_total", model=CHAT) == 0.375


async def test_a_free_or_unattributed_request_moves_neither_counter() -> None:
    config, registry = node_config(), CollectorRegistry()
    metrics = GatewayMetrics(registry, charge_micro=the_ledgers_charge)
    # An engine error is not charged (routers do not charge it); a refusal never reached an engine.
    await metrics.finalize(finished(config, Usage(prompt_tokens=10, completion_tokens=5), gpu_seconds=0.5,
                                    outcome="engine_error"))
    await metrics.finalize(finished(config, None, gpu_seconds=None, outcome="rejected"))
    await metrics.finalize(finished(config, Usage(prompt_tokens=10, completion_tokens=5), gpu_seconds=0.0,
                                    model=1))
    page = generate_latest(registry).decode()
    assert value(page, "worker_revenue_usd_total", model=CHAT) == 0
    assert value(page, "worker_gpu_seconds_attributed_total", model=CHAT) == 0.5  # the GPU worked all the same
    assert value(page, "worker_revenue_usd_total", model="acme/other") == 0


def test_gauges_show_the_price_and_the_gpus_the_replicas_hold() -> None:
    config = node_config(gpu_hour_usd="2.75")
    replicas = [SimpleNamespace(model_id=CHAT, replica_id="acme-chat-0", state=ReplicaState.ready,
                                spec=SimpleNamespace(gpu_ids=(0, 1))),
                SimpleNamespace(model_id=CHAT, replica_id="acme-chat-1", state=ReplicaState.stopped,
                                spec=SimpleNamespace(gpu_ids=(2, 3))),
                SimpleNamespace(model_id="acme/other", replica_id="acme-other-0", state=ReplicaState.starting,
                                spec=SimpleNamespace(gpu_ids=(4,)))]
    registry = CollectorRegistry()
    registry.register(EconomicsCollector(config, replicas,  # type: ignore[arg-type]
                                         busy_seconds=lambda: {"acme-chat-0": 1.5, "acme-chat-1": 0.25}))
    page = generate_latest(registry).decode()
    assert value(page, "worker_gpu_hour_usd", model=CHAT) == 2.75
    assert value(page, "worker_gpu_hour_usd", model="acme/other") == 2.75
    # Two GPUs per replica for acme/chat, of which one replica is stopped; the other model's one is loading.
    assert value(page, "worker_gpus_provisioned", model=CHAT) == 2
    assert value(page, "worker_gpus_provisioned", model="acme/other") == 1
    # Busy seconds x GPUs per replica; a replica the meters never saw busy shows 0.
    assert value(page, "worker_replica_busy_gpu_seconds_total", model=CHAT, replica="acme-chat-0") == 3.0
    assert value(page, "worker_replica_busy_gpu_seconds_total", model=CHAT, replica="acme-chat-1") == 0.5
    assert value(page, "worker_replica_busy_gpu_seconds_total", model="acme/other", replica="acme-other-0") == 0
    # Which GPUs each model holds, to read NVML's utilisation of them: the stopped replica's GPUs are free.
    held = {(labels["model"], labels["gpu"]) for name, labels in
            ((name, dict(labels)) for name, labels in samples(page)) if name == "worker_replica_gpu_info"}
    assert held == {(CHAT, "0"), (CHAT, "1"), ("acme/other", "4")}


def test_a_models_own_price_overrides_the_workers() -> None:
    config = parse_node_config({
        "worker": {"id": "w", "gpu_hour_usd": "2.00"},
        "models": [fast_mock_model(CHAT, gpu_hour_usd="3.10"), fast_mock_model("acme/other")],
    })
    registry = CollectorRegistry()
    registry.register(EconomicsCollector(config, [], busy_seconds=dict))
    page = generate_latest(registry).decode()
    assert value(page, "worker_gpu_hour_usd", model=CHAT) == 3.1
    assert value(page, "worker_gpu_hour_usd", model="acme/other") == 2.0


# --- A worker on the mock engine, with the worker process relaying and with relay processes ------------


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "relay-processes"])
def worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    processes = request.param
    config = {"worker": {"id": "economics-worker", "gateway_processes": processes, "gpu_hour_usd": "2.40"},
              "models": [fast_mock_model(CHAT, gpus_per_replica=2,
                                         pricing={"prompt_per_mtok": "0.30", "completion_per_mtok": "1.70"})]}
    proc = start_worker(tmp_path_factory.mktemp("economics"), config)
    ready_or_stopped(proc, lambda: len(proc.gateway_processes()) == (processes if processes > 1 else 0))
    try:
        yield proc
    finally:
        proc.stop()


def test_a_request_on_the_mock_moves_the_counters_by_its_cost_and_gpu_seconds(worker: WorkerProcess) -> None:
    def page() -> str:
        return httpx.get(f"{worker.base_url}/metrics", timeout=10).text

    before = page()
    response = httpx.post(f"{worker.base_url}/v1/chat/completions", timeout=30, json={
        "model": CHAT, "messages": [{"role": "user", "content": "count the stones by the river"}], "max_tokens": 12})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    gpu_seconds = float(response.headers["x-worker-gpu-seconds"])
    assert usage["cost"] > 0 and gpu_seconds > 0

    def moved() -> bool:
        return value(page(), "worker_revenue_usd_total", model=CHAT) > value(before, "worker_revenue_usd_total",
                                                                              model=CHAT)

    # A relay process tells the worker process how the request ended after its last byte.
    assert wait_until(moved, timeout_s=10)
    after = page()
    revenue = value(after, "worker_revenue_usd_total", model=CHAT) - value(before, "worker_revenue_usd_total",
                                                                            model=CHAT)
    gpu = (value(after, "worker_gpu_seconds_attributed_total", model=CHAT)
           - value(before, "worker_gpu_seconds_attributed_total", model=CHAT))
    assert revenue == pytest.approx(usage["cost"], abs=1e-12)
    assert gpu == pytest.approx(gpu_seconds, abs=1e-6)  # the header carries 6 decimals at most
    assert value(after, "worker_gpu_hour_usd", model=CHAT) == 2.4
    assert value(after, "worker_gpus_provisioned", model=CHAT) == 2  # one replica of two GPUs
    # The replica was busy (a request in flight) at least while its engine computed this request.
    busy = (value(after, "worker_replica_busy_gpu_seconds_total", model=CHAT, replica="acme-chat-0")
            - value(before, "worker_replica_busy_gpu_seconds_total", model=CHAT, replica="acme-chat-0"))
    assert busy >= gpu > 0
    tokens = value(after, "worker_prompt_tokens_total", model=CHAT) - value(before, "worker_prompt_tokens_total",
                                                                            model=CHAT)
    assert tokens == usage["prompt_tokens"]
