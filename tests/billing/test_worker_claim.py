"""One running worker per worker id on a billing database: balance holds are kept in the id's name."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.billing.support import bearer, chat_model, make_context, make_key, make_request, provenance_for
from tests.billing.test_ledger_store import reservation
from tests.capacity.capacity_support import FAST_HEALTH, chat_body, paced_model
from tests.support.worker_process import eventually, serving
from worker.billing.claim import ClaimTiming, WorkerIdInUse
from worker.billing.service import BillingService
from worker.billing.store import open_store
from worker.billing.store.records import ReserveOutcome, WorkerClaim
from worker.config import NodeConfig, Settings
from worker.gateway.errors import api_error
from worker.node import WorkerNode
from worker.refusals import Refusal

# Short enough for a test; the defaults renew every 10 s and give up on a silent holder after 30 s.
TIMING = ClaimTiming(renew_s=0.05, stale_s=0.5, retry_s=0.05)
LIVENESS_S = 20.0


def node_config(worker_id: str = "worker-1") -> NodeConfig:
    return NodeConfig(worker={"id": worker_id}, models=[chat_model()])


async def open_service(db_url: str, worker_id: str = "worker-1") -> BillingService:
    settings = Settings(auth=True, db_url=db_url, admin_token=None)
    return await asyncio.wait_for(
        BillingService.open(settings, node_config(worker_id), provenance_for, claim_timing=TIMING), LIVENESS_S)


@pytest.fixture
async def first(db_url: str) -> AsyncIterator[BillingService]:
    service = await open_service(db_url)
    yield service
    await service.close()


async def test_a_second_worker_with_the_same_id_is_refused_while_the_first_runs(
    first: BillingService, db_url: str
) -> None:
    with pytest.raises(WorkerIdInUse, match=r"worker\.id 'worker-1' is in use by another running worker"):
        await open_service(db_url)
    # Another id is no trouble, and the first still holds its own.
    other = await open_service(db_url, worker_id="worker-2")
    await other.close()
    assert first.claim.instance_id is not None
    assert await first.store.renew_worker_claim("worker-1", first.claim.instance_id, now=first.claim.clock())


async def test_a_worker_that_stopped_hands_its_id_on_at_once(db_url: str) -> None:
    first = await open_service(db_url)
    await first.close()
    second = await open_service(db_url)
    await second.close()
    assert second.claim.instance_id != first.claim.instance_id


async def test_a_killed_workers_id_is_taken_over_and_its_holds_released(db_url: str) -> None:
    killed = await open_service(db_url)
    funded = await make_key(killed.store, balance_micro=1_000)
    assert await killed.store.reserve(reservation(funded.key, 1_000, holder="worker-1")) is ReserveOutcome.reserved
    # Killed: it neither renews its claim nor releases it, and its hold is never settled.
    assert killed.claim.renewal is not None
    killed.claim.renewal.cancel()
    killed.claim.instance_id = None
    await killed.close()

    successor = await open_service(db_url)
    try:
        account = await successor.store.get_account(funded.account.id)
        assert account is not None and account.reserved_micro == 0
    finally:
        await successor.close()


async def test_a_worker_whose_id_was_taken_over_says_so(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    paused = await open_service(db_url)
    try:
        assert paused.claim.renewal is not None
        paused.claim.renewal.cancel()  # unheard for longer than the claim lasts (a long pause, a partition)
        successor = await open_service(db_url)
        told: list[str] = []

        async def drain() -> None:
            told.append("taken over")

        paused.claim.when_lost(drain)
        paused.claim.renewal = asyncio.create_task(paused.claim.renew())
        with caplog.at_level(logging.ERROR, logger="worker.billing.claim"):
            await asyncio.wait_for(paused.claim.renewal, LIVENESS_S)
        assert "another worker took over this worker id" in caplog.text
        assert told == ["taken over"]  # the node drains on it
        # Its requests are refused from now on: the successor may release what they would hold.
        funded = await make_key(paused.store, balance_micro=1_000_000)
        with pytest.raises(Refusal) as refused:
            await paused.before_request(make_context(chat_model()), make_request(bearer(funded.plaintext)))
        answer = api_error(refused.value)
        assert (answer.status, answer.code) == (503, "worker_id_taken_over")
        assert answer.headers["retry-after"] == "5"
        await successor.close()
    finally:
        await paused.close()


async def claim_of_a_process(db_url: str, pid: int, process_started_at: float) -> None:
    """What a worker on this host left in the database when it stopped without a word, a moment ago."""
    store = await open_store(db_url)
    try:
        now = time.time()
        assert await store.claim_worker_id(
            WorkerClaim(worker_id="worker-1", instance_id="before", host=socket.gethostname(), pid=pid,
                        process_started_at=process_started_at, claimed_at=now, seen_at=now),
            stale_before=now) is None
    finally:
        await store.close()


async def test_a_holder_on_this_host_that_is_gone_is_not_waited_for(db_url: str) -> None:
    ended = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await ended.wait() == 0
    await claim_of_a_process(db_url, ended.pid, process_started_at=time.time() - 1)
    # Waiting for the claim to lapse would outlast the test's patience.
    service = await asyncio.wait_for(BillingService.open(
        Settings(auth=True, db_url=db_url, admin_token=None), node_config(), provenance_for,
        claim_timing=ClaimTiming(renew_s=3600, stale_s=3600)), LIVENESS_S)
    try:
        await holds_the_claim(service)
    finally:
        await service.close()


async def test_a_restarted_container_takes_its_id_back_although_its_process_id_is_the_same(db_url: str) -> None:
    # The same pid (1 in a container, say), but a process that started earlier: this one's predecessor.
    await claim_of_a_process(db_url, os.getpid(), process_started_at=psutil.Process().create_time() - 60)
    service = await asyncio.wait_for(BillingService.open(
        Settings(auth=True, db_url=db_url, admin_token=None), node_config(), provenance_for,
        claim_timing=ClaimTiming(renew_s=3600, stale_s=3600)), LIVENESS_S)
    try:
        await holds_the_claim(service)
    finally:
        await service.close()


async def holds_the_claim(service: BillingService) -> None:
    """The database's claim on the id is this service's now: its renewal succeeds, the predecessor's is gone."""
    assert service.claim.instance_id not in (None, "before")
    assert await service.store.renew_worker_claim("worker-1", service.claim.instance_id, time.time())
    assert not await service.store.renew_worker_claim("worker-1", "before", time.time())


async def test_a_node_whose_worker_id_was_taken_over_is_not_ready_and_refuses_requests(tmp_path: Path) -> None:
    config = NodeConfig.model_validate({
        "worker": {"id": "worker-1", "engine_health": FAST_HEALTH},
        "models": [paced_model("acme/chat", step_ms=1.0)],
    })
    admin_token = "admin-secret-0123456789abcdef0123456789"
    settings = Settings(auth=False, db_url=f"sqlite:///{tmp_path / 'ledger.db'}", admin_token=admin_token)
    node = WorkerNode(config, settings, gpu_count=0)
    async with serving(node.app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        assert await eventually(lambda: _ready(client, 200))
        assert (await client.post("/v1/chat/completions", json=chat_body("acme/chat", 4))).status_code == 200
        assert node.billing is not None
        await node.billing.claim.mark_lost()  # what the claim's renewal does when another worker took the id

        readiness = await client.get("/health/ready")
        assert readiness.status_code == 503
        assert readiness.json()["worker_id_taken_over"] is True and readiness.json()["draining"] is True
        assert (await client.get("/capacity")).json()["draining"] is True
        refused = await client.post("/v1/chat/completions", json=chat_body("acme/chat", 4))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "worker_id_taken_over"
        # The drain is for good: undraining cannot put a worker whose id is taken back in service.
        undrain = await client.post("/admin/undrain", headers={"authorization": f"Bearer {admin_token}"})
        assert (undrain.status_code, undrain.json()["error"]["code"]) == (409, "shutting_down")
        assert await _ready(client, 503)


async def _ready(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/health/ready")).status_code == status
