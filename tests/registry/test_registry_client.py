"""Registration against a local registry that fails now and then: order of calls, retries, token, outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from tests.registry.receiver import Receiver, ReceiverServer, free_port
from worker.config import NodeConfig, Settings
from worker.gpu import GpuFleetSnapshot, GpuHealth, GpuReadings, GpuStatus
from worker.registry import (
    Announcement,
    ModelCatalog,
    RegistryClient,
    RegistryCollector,
    RetryPolicy,
)

TOKEN = "s3cret-registry-token"
FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, shutdown_budget_s=5.0)
CONFIG = NodeConfig.model_validate({
    "worker": {"id": "node-7", "public_url": "http://from-models-yaml.example:8000",
               "datacenters": [{"country_code": "US", "region": "us-east"}]},
    "models": [{"id": "llama-70b", "source": "org/Llama-70B", "quantization": "bf16",
                "pricing": {"prompt_per_mtok": "0.13", "completion_per_mtok": "0.38"}}],
})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Receiver, ReceiverServer]]:
    receiver = Receiver()
    running = ReceiverServer(receiver).open()
    try:
        yield receiver, running
    finally:
        running.close()


@pytest.fixture
def registry(server: tuple[Receiver, ReceiverServer]) -> tuple[Receiver, str]:
    receiver, running = server
    receiver.reset()
    return receiver, running.url


def capacity_document(draining: bool = False) -> dict[str, Any]:
    return {"worker_id": "node-7", "ready": not draining, "draining": draining, "taken_at": 1.0,
            "gpu_monitoring": "available",
            "models": [{"id": "llama-70b", "state": "draining" if draining else "ready", "max_model_len": 4096,
                        "admission_enabled": True,
                        "replicas": [{"replica": "llama-70b-0", "state": "ready"},
                                     {"replica": "llama-70b-1", "state": "starting"}]}]}


def gpu_snapshot() -> GpuFleetSnapshot:
    return GpuFleetSnapshot(nvml_state="available", driver_version="580.95.05", taken_at=1.0, gpus=[
        GpuStatus(index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", health=GpuHealth.HEALTHY,
                  readings=GpuReadings(memory_total_bytes=80 * 1024**3))])


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def node_client(url: str | None, capacity: Callable[[], dict[str, Any] | None] = capacity_document,
                heartbeat_s: float = 0.05) -> RegistryClient:
    settings = Settings(registry_url=url, registry_token=TOKEN, registry_heartbeat_s=heartbeat_s,  # type: ignore[arg-type]
                        public_url="https://worker-7.example.net")
    catalog = ModelCatalog(CONFIG, readiness=lambda _: True, created=1_700_000_000)
    return RegistryClient.for_node(CONFIG, settings, version="9.9.9", started_at=1_700_000_000,
                                   listing=catalog.listing, capacity=capacity, gpus=gpu_snapshot, retry=FAST)


async def test_announce_heartbeats_draining_deregister_in_order_with_retries(
        registry: tuple[Receiver, str], caplog: pytest.LogCaptureFixture) -> None:
    receiver, url = registry
    receiver.script("announce", 503, 502)  # the registry is briefly unwell: two retries
    receiver.script("heartbeat", 200, 500)  # the second heartbeat fails once and is retried
    caplog.set_level(logging.DEBUG)
    state = {"draining": False}
    # Long enough between heartbeats that a heartbeat's retry always fits before the next one is due.
    client = node_client(url, capacity=lambda: capacity_document(state["draining"]), heartbeat_s=0.3)
    await client.start()
    try:
        await wait_for(lambda: len(receiver.of("heartbeat", 200)) >= 3)
        state["draining"] = True
        await client.draining()
        await wait_for(lambda: any(c.body["status"] == "draining" for c in receiver.of("heartbeat", 200)))
    finally:
        await client.stop()
    await client.stop()  # idempotent

    kinds = receiver.kinds()
    assert kinds[:3] == ["announce"] * 3
    assert [c.status for c in receiver.of("announce")] == [503, 502, 200]
    assert kinds.index("draining") > kinds.index("heartbeat")
    assert kinds[-1] == "deregister" and kinds.count("deregister") == 1
    assert set(kinds) == {"announce", "heartbeat", "draining", "deregister"}
    assert all(call.authorization == f"Bearer {TOKEN}" for call in receiver.calls)
    assert {call.worker_id for call in receiver.calls} == {"node-7"}

    announcement = Announcement.model_validate(receiver.of("announce", 200)[0].body)
    assert announcement.public_url == "https://worker-7.example.net/"  # WORKER_PUBLIC_URL wins over models.yaml
    assert announcement.version == "9.9.9" and announcement.heartbeat_interval_s == 0.3
    assert announcement.datacenters == [{"country_code": "US", "region": "us-east"}]
    (model,) = announcement.models
    assert model["id"] == "llama-70b" and model["pricing"]["prompt"] == "0.00000013" and model["is_ready"] is True
    assert announcement.gpus.count == 1 and announcement.gpus.devices[0].memory_total_bytes == 80 * 1024**3
    assert announcement.capacity is not None
    assert announcement.capacity.models[0].model_dump() == {"id": "llama-70b", "state": "ready", "replicas": 2,
                                                            "ready_replicas": 1, "max_model_len": 4096,
                                                            "loading_fraction": None}

    heartbeats = receiver.of("heartbeat")
    assert [c.status for c in heartbeats[:3]] == [200, 500, 200]
    assert heartbeats[1].body["sequence"] == heartbeats[2].body["sequence"] == 2  # a retry, not a new beat
    sequences = [c.body["sequence"] for c in receiver.of("heartbeat", 200)]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert heartbeats[0].body["capacity"] == capacity_document()
    first_draining = kinds.index("draining")
    assert all(c.body["status"] == "serving" for c in receiver.of("heartbeat")[:2])
    assert receiver.calls[first_draining].body["status"] == "draining"
    assert receiver.of("heartbeat")[-1].body["status"] == "draining"

    assert (client.counts["announce"].attempts, client.counts["announce"].successes) == (3, 1)
    assert client.counts["announce"].failures == 0
    assert client.counts["deregister"].successes == 1
    logged = "\n".join(repr(vars(record)) for record in caplog.records)
    assert TOKEN not in logged
    assert "retrying" in logged  # retries are logged


async def test_forgotten_worker_announces_again(registry: tuple[Receiver, str]) -> None:
    receiver, url = registry
    receiver.script("heartbeat", 404)  # say the registry restarted and lost its table
    client = node_client(url)
    await client.start()
    try:
        await wait_for(lambda: len(receiver.of("announce", 200)) == 2 and len(receiver.of("heartbeat", 200)) >= 1)
    finally:
        await client.stop()
    kinds = receiver.kinds()
    assert kinds[:3] == ["announce", "heartbeat", "announce"]
    assert client.counts["heartbeat"].attempts >= 2  # the 404 was not retried: it means "announce again"


async def test_refusals_are_not_retried(registry: tuple[Receiver, str]) -> None:
    receiver, url = registry
    receiver.script("announce", 401, 403)  # a wrong token: retrying the same call cannot help
    client = node_client(url)
    await client.start()
    try:
        await wait_for(lambda: client.announced)
    finally:
        await client.stop()
    counts = client.counts["announce"]
    assert (counts.attempts, counts.failures, counts.successes) == (3, 2, 1)
    assert [c.status for c in receiver.of("announce")] == [401, 403, 200]
    assert counts.last_error is not None and "403" in counts.last_error


async def test_registry_outage_never_reaches_the_worker() -> None:
    client = node_client(f"http://127.0.0.1:{free_port()}/nothing-listens-here")
    await client.start()
    try:
        await wait_for(lambda: client.counts["announce"].failures >= 2)
        assert not client.announced
        await client.draining()  # returns, without raising, although the registry is unreachable
    finally:
        await client.stop()
    assert client.counts["announce"].attempts >= 2 * FAST.attempts  # every failed call was retried
    assert client.counts["draining"].failures == 1
    assert client.counts["deregister"].failures == 1
    assert client.counts["heartbeat"].attempts == 0  # never announced: no heartbeats

    registry = CollectorRegistry()
    registry.register(RegistryCollector(client))
    text = generate_latest(registry).decode()
    assert 'worker_registry_calls_total{call="deregister",outcome="failure"} 1.0' in text
    assert "worker_registry_announced 0.0" in text


async def test_nothing_happens_without_a_registry_url() -> None:
    client = node_client(None)
    assert not client.enabled
    await client.start()
    await client.draining()
    await client.stop()
    assert all(counts.attempts == 0 for counts in client.counts.values())
    assert client.is_draining is False


async def test_plain_client_reports_successes_in_metrics(registry: tuple[Receiver, str]) -> None:
    receiver, url = registry
    client = RegistryClient(url + "/", worker_id="w1", token=SecretStr(TOKEN), retry=FAST, heartbeat_interval_s=0.05,
                            announcement=lambda: Announcement.model_validate({
                                "worker_id": "w1", "public_url": None, "version": "1", "started_at": 1,
                                "heartbeat_interval_s": 0.05, "models": [],
                                "gpus": {"nvml_state": "nvml_unavailable", "count": 0}}),
                            capacity=lambda: None)
    await client.start()
    try:
        await wait_for(lambda: len(receiver.of("heartbeat")) >= 1)
        registry_metrics = CollectorRegistry()
        registry_metrics.register(RegistryCollector(client))
        text = generate_latest(registry_metrics).decode()
    finally:
        await client.stop()
    assert 'worker_registry_calls_total{call="announce",outcome="success"} 1.0' in text
    assert "worker_registry_announced 1.0" in text
    assert 'worker_registry_last_success_timestamp_seconds{call="announce"}' in text
    assert receiver.of("heartbeat")[0].body["capacity"] is None
    assert receiver.of("heartbeat")[0].body["status"] == "serving"
