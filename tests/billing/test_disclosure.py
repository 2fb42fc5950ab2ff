"""Provenance headers and `usage.cost`: what every response discloses, with the ledger on or off."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tests.billing.support import (
    chat_model,
    disclosure,
    fake_replica,
    make_context,
    make_request,
    provenance_for,
)
from worker.billing.disclosure import ProvenanceCache
from worker.billing.provenance import Provenance
from worker.gateway.context import Usage


async def test_provenance_headers_before_and_after_routing() -> None:
    hook = disclosure()
    ctx = make_context()
    await hook.before_request(ctx, make_request({}))
    assert ctx.response_headers == {"x-worker-id": "worker-1", "x-worker-engine-version": "vllm 0.32.0"}
    ctx.replica = fake_replica(gpu_ids=(2, 3))
    hook.after_route(ctx)
    assert ctx.response_headers == {
        "x-worker-id": "worker-1",
        "x-worker-replica": "acme-chat-0",
        "x-worker-gpu": "NVIDIA H100 80GB HBM3",
        "x-worker-gpu-uuid": "GPU-2,GPU-3",
        "x-worker-model-revision": "abc123",
        "x-worker-engine-version": "vllm 0.32.0",
    }


async def test_usage_carries_the_cost_from_the_models_prices() -> None:
    hook = disclosure()
    ctx = make_context(chat_model(request="0.0001"))
    ctx.usage, ctx.finish_reason = Usage(prompt_tokens=120, completion_tokens=40), "stop"
    assert hook.usage_extras(ctx) == {"cost": 0.0003}  # 120 * 1 + 40 * 2 + 100 micro-USD
    ctx.finish_reason = "error"
    assert hook.usage_extras(ctx) == {"cost": 0.0}


class CountingDescription:
    """A node's provenance builder that counts how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.gpu_model = "NVIDIA H100 80GB HBM3"

    def __call__(self, replica: Any) -> Provenance:
        self.calls += 1
        if replica is None:
            return provenance_for(None)
        return Provenance(
            worker_id="worker-1",
            replica_id=replica.replica_id,
            gpu_model=self.gpu_model,
            engine_version=replica.engine.version,
        )


def versioned_replica(version: str) -> Any:
    return SimpleNamespace(
        replica_id="acme-chat-0", spec=SimpleNamespace(gpu_ids=(0,)), engine=SimpleNamespace(version=version)
    )


def test_provenance_is_built_once_per_replica_until_its_engine_version_changes() -> None:
    describe, now = CountingDescription(), [0.0]
    cache = ProvenanceCache(describe, engine_version_of=lambda r: r.engine.version, clock=lambda: now[0])
    replica = versioned_replica("vllm")
    describe.calls = 0
    for _ in range(100):
        assert cache(replica).engine_version == "vllm"
        assert cache.headers(None)["x-worker-id"] == "worker-1"
    assert describe.calls == 1
    replica.engine.version = "vllm 0.32.0"  # read from the engine once it became healthy
    assert cache.headers(replica)["x-worker-engine-version"] == "vllm 0.32.0"
    assert describe.calls == 2


def test_provenance_is_read_again_after_its_max_age_or_when_invalidated() -> None:
    describe, now = CountingDescription(), [0.0]
    cache = ProvenanceCache(
        describe, engine_version_of=lambda r: r.engine.version, max_age_s=5.0, clock=lambda: now[0]
    )
    replica = versioned_replica("vllm 0.32.0")
    assert cache(replica).gpu_model == "NVIDIA H100 80GB HBM3"
    describe.gpu_model = "NVIDIA H200"
    now[0] = 4.0
    assert cache(replica).gpu_model == "NVIDIA H100 80GB HBM3"
    now[0] = 5.0
    assert cache(replica).gpu_model == "NVIDIA H200"
    describe.gpu_model = "NVIDIA B200"
    cache.invalidate()
    assert cache(replica).gpu_model == "NVIDIA B200"
