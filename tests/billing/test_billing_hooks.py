"""The billing hooks as the gateway calls them, with a real RequestContext and a hand-built request."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.billing.support import (
    bearer,
    chat_model,
    disclosure,
    fake_replica,
    make_context,
    make_key,
    make_request,
    provenance_for,
)
from tests.support.worker_process import eventually
from worker.billing.keys import generate_api_key, issue_key
from worker.billing.pricing import RequestShape, worst_case_micro
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore
from worker.billing.store.records import KeyLimits, LedgerFilter, LedgerRecord
from worker.gateway.context import Principal, RequestContext, Usage
from worker.gateway.errors import ApiError, api_error
from worker.refusals import Refusal


async def refused(service: BillingService, ctx: RequestContext, headers: dict[str, str]) -> ApiError:
    """The answer to billing's refusal, after the disclosure hook ran ahead of it as on the node."""
    request = make_request(headers)
    await disclosure().before_request(ctx, request)
    with pytest.raises(Refusal) as caught:
        await service.before_request(ctx, request)
    return api_error(caught.value, ctx.response_headers)


async def only_record(store: LedgerStore) -> LedgerRecord:
    records = await store.query_ledger(LedgerFilter(), limit=10)
    assert len(records) == 1
    return records[0]


def finish(
    ctx: RequestContext,
    usage: Usage | None,
    *,
    finish_reason: str | None = "stop",
    outcome: str = "ok",
    status: int = 200,
) -> None:
    """What the relay fills in before it calls finalize."""
    ctx.replica = fake_replica()
    ctx.status_code = status
    ctx.usage = usage
    ctx.finish_reason = finish_reason
    ctx.outcome = outcome
    ctx.first_byte_monotonic = ctx.started_monotonic + 0.010
    ctx.finished_monotonic = ctx.started_monotonic + 0.050


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {generate_api_key()}"},  # well-formed but unknown
        {"x-api-key": generate_api_key()},
    ],
)
async def test_requests_without_a_valid_key_get_401(service: BillingService, headers: dict[str, str]) -> None:
    error = await refused(service, make_context(), headers)
    assert (error.status, error.code, error.error_type) == (401, "invalid_api_key", "authentication_error")
    assert error.headers["x-worker-id"] == "worker-1"


async def test_revocation_applies_to_the_very_next_request(
    service: BillingService, store: LedgerStore
) -> None:
    funded = await make_key(store)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    await store.revoke_key(funded.key.id, time.time())
    error = await refused(service, make_context(), bearer(funded.plaintext))
    assert (error.status, error.code) == (401, "invalid_api_key")
    assert "revoked" in error.message


async def test_expired_key_gets_401(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    error = await refused(service, make_context(), {"x-api-key": funded.plaintext})
    assert (error.status, error.code) == (401, "invalid_api_key")
    assert "expired" in error.message


async def test_model_outside_the_key_allow_list_gets_403(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store, allowed_models=("acme/other",))
    error = await refused(service, make_context(), bearer(funded.plaintext))
    assert (error.status, error.error_type) == (403, "permission_error")


async def test_balance_below_the_worst_case_gets_402(service: BillingService, store: LedgerStore) -> None:
    # Worst case of make_context(): prompt bound (JSON bytes + 64) at 1/Mtok + 100 completion at 2/Mtok.
    funded = await make_key(store, balance_micro=100)
    error = await refused(service, make_context(max_tokens=100), bearer(funded.plaintext))
    assert (error.status, error.code, error.error_type) == (402, "insufficient_quota", "insufficient_quota")
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 0


async def test_concurrent_requests_never_overdraw(service: BillingService, store: LedgerStore) -> None:
    model = chat_model()
    probe = make_context(model, max_tokens=100)
    worst = worst_case_micro(model, RequestShape.of("chat.completions", probe.body, 100))
    funded = await make_key(store, balance_micro=worst * 10 + worst // 2)
    contexts = [make_context(model, max_tokens=100) for _ in range(50)]

    async def attempt(ctx: RequestContext) -> int:
        try:
            await service.before_request(ctx, make_request(bearer(funded.plaintext)))
        except Refusal as refusal:
            return api_error(refusal).status
        return 200

    statuses = await asyncio.gather(*(attempt(ctx) for ctx in contexts))
    assert statuses.count(200) == 10 and statuses.count(402) == 40
    assert service.backlog().reservations_held == 10
    admitted = [ctx for ctx, status in zip(contexts, statuses, strict=True) if status == 200]
    for ctx in admitted:
        finish(ctx, Usage(prompt_tokens=10, completion_tokens=10))
    await asyncio.gather(*(service.finalize(ctx) for ctx in admitted))
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 0
    assert account.balance_micro == worst * 10 + worst // 2 - 10 * 30  # 10 * (10 * 1 + 10 * 2) micro-USD
    assert service.backlog().reservations_held == 0


async def test_monthly_spend_cap_gets_402(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store, monthly_spend_cap_micro=50)
    error = await refused(service, make_context(max_tokens=100), bearer(funded.plaintext))
    assert (error.status, error.code) == (402, "spend_cap_reached")


async def test_rate_limit_gets_429_with_openai_headers(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store, requests_per_minute=2, tokens_per_minute=100_000)
    for _ in range(2):
        ctx = make_context()
        await service.before_request(ctx, make_request(bearer(funded.plaintext)))
        assert ctx.response_headers["x-ratelimit-limit-requests"] == "2"
        assert ctx.response_headers["x-ratelimit-limit-tokens"] == "100000"
        for name in ("remaining-requests", "reset-requests", "remaining-tokens", "reset-tokens"):
            assert f"x-ratelimit-{name}" in ctx.response_headers
    error = await refused(service, make_context(), bearer(funded.plaintext))
    assert (error.status, error.code, error.error_type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert int(error.headers["retry-after"]) >= 1
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"].endswith("s")
    assert error.headers["x-worker-id"] == "worker-1"
    # Only the two admitted requests hold reservations.
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro > 0
    assert service.backlog().reservations_held == 2


async def test_completed_request_is_recorded_and_charged_its_real_cost(
    service: BillingService, store: LedgerStore
) -> None:
    funded = await make_key(store, balance_micro=1_000_000)
    ctx = make_context(max_tokens=100)
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    assert isinstance(ctx.principal, Principal)
    finish(ctx, Usage(prompt_tokens=120, completion_tokens=40))
    assert disclosure().usage_extras(ctx) == {"cost": 0.0002}  # 120 * 1 + 40 * 2 micro-USD
    assert service.usage_extras(ctx) == {}
    await service.finalize(ctx)

    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000_000 - 200, 0)
    record = await only_record(store)
    assert (record.record_id, record.request_id) == (ctx.record_id, ctx.request_id)
    assert (record.key_id, record.account_id) == (funded.key.id, funded.account.id)
    assert (record.model, record.endpoint, record.replica_id) == (
        "acme/chat",
        "chat.completions",
        "acme-chat-0",
    )
    assert record.gpu_uuids == ("GPU-0", "GPU-1")
    assert (record.prompt_tokens, record.completion_tokens, record.cost_micro) == (120, 40, 200)
    assert (record.status_code, record.outcome, record.finish_reason) == (200, "ok", "stop")
    assert record.ttft_ms == pytest.approx(10.0) and record.duration_ms == pytest.approx(50.0)
    assert record.received_at.timestamp() == pytest.approx(ctx.received_at)
    assert record.worker_id == "worker-1"


@pytest.mark.parametrize(
    ("usage", "finish_reason", "outcome", "cost"),
    [
        (Usage(prompt_tokens=50, completion_tokens=5), "error", "engine_error", 0),
        (None, None, "upstream_failed", 0),
        (Usage(prompt_tokens=50, completion_tokens=0), "stop", "ok", 0),
        (Usage(prompt_tokens=0, completion_tokens=7), None, "client_disconnected", 14),
        (None, None, "client_disconnected", 0),
    ],
)
async def test_failed_or_empty_requests_are_recorded_and_cost_what_was_generated(
    service: BillingService,
    store: LedgerStore,
    usage: Usage | None,
    finish_reason: str | None,
    outcome: str,
    cost: int,
) -> None:
    funded = await make_key(store, balance_micro=1_000_000)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    finish(ctx, usage, finish_reason=finish_reason, outcome=outcome)
    await service.finalize(ctx)
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000_000 - cost, 0)
    record = await only_record(store)
    assert (record.outcome, record.cost_micro) == (outcome, cost)


async def test_requests_refused_after_billing_admitted_them_release_the_reservation(
    service: BillingService, store: LedgerStore
) -> None:
    """E.g. capacity answers 429 after billing reserved: the gateway finalizes with outcome 'rejected'."""
    funded = await make_key(store, balance_micro=1_000_000)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    ctx.outcome, ctx.status_code = "rejected", 429
    await service.finalize(ctx)
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000_000, 0)
    record = await only_record(store)
    assert (record.status_code, record.replica_id, record.gpu_uuids) == (429, None, ())


async def test_a_reused_request_id_is_served_and_recorded_each_time(
    service: BillingService, store: LedgerStore
) -> None:
    funded = await make_key(store, balance_micro=1_000_000)
    contexts = [make_context(request_id="req-client-chosen") for _ in range(2)]
    # Both in flight at once: each holds its own reservation, keyed by its own record id.
    for ctx in contexts:
        await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    assert service.backlog().reservations_held == 2
    for completion_tokens, ctx in enumerate(contexts, start=1):
        finish(ctx, Usage(prompt_tokens=10, completion_tokens=completion_tokens))
        await service.finalize(ctx)

    records = await store.query_ledger(LedgerFilter(request_id="req-client-chosen"), limit=10, order="asc")
    assert [r.record_id for r in records] == [ctx.record_id for ctx in contexts]
    assert contexts[0].record_id != contexts[1].record_id
    assert [r.cost_micro for r in records] == [12, 14]
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000_000 - 26, 0)


async def test_without_auth_every_request_is_still_recorded(store: LedgerStore) -> None:
    service = BillingService(
        store=store, worker_id="worker-1", auth_required=False, provenance=provenance_for
    )
    ctx = make_context()
    await service.before_request(ctx, make_request({}))
    assert ctx.principal is None
    finish(ctx, Usage(prompt_tokens=10, completion_tokens=10))
    assert disclosure().usage_extras(ctx) == {"cost": 0.00003}
    await service.finalize(ctx)
    record = await only_record(store)
    assert (record.key_id, record.account_id, record.cost_micro) == (None, None, 30)


async def test_without_auth_a_reused_request_id_is_recorded_each_time(store: LedgerStore) -> None:
    service = BillingService(
        store=store, worker_id="worker-1", auth_required=False, provenance=provenance_for
    )
    contexts = [make_context(request_id="req-client-chosen") for _ in range(3)]
    for ctx in contexts:
        await service.before_request(ctx, make_request({}))
        finish(ctx, Usage(prompt_tokens=10, completion_tokens=10))
        await service.finalize(ctx)
    records = await store.query_ledger(LedgerFilter(), limit=10, order="asc")
    assert [(r.record_id, r.request_id) for r in records] == [
        (ctx.record_id, "req-client-chosen") for ctx in contexts
    ]
    assert len({r.record_id for r in records}) == 3


async def test_settling_the_same_request_twice_records_and_charges_it_once(
    service: BillingService, store: LedgerStore, caplog: pytest.LogCaptureFixture
) -> None:
    funded = await make_key(store, balance_micro=1_000_000)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    finish(ctx, Usage(prompt_tokens=10, completion_tokens=10))
    await service.finalize(ctx)
    with caplog.at_level(logging.ERROR, logger="worker.billing"):
        await service.finalize(ctx)
    assert any("settled already" in r.getMessage() for r in caplog.records)
    assert (await only_record(store)).record_id == ctx.record_id
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000_000 - 30, 0)


async def test_byok_keys_mark_usage(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store, byok=True)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    finish(ctx, Usage(prompt_tokens=1, completion_tokens=1))
    assert service.usage_extras(ctx) == {"is_byok": True}


async def test_requests_queue_by_account_at_their_keys_priority(service: BillingService, store: LedgerStore) -> None:
    funded = await make_key(store)
    prioritised = await issue_key(store, account_id=funded.account.id, name="router", limits=KeyLimits(),
                                  priority=3)
    assert (await store.get_key(prioritised.key.id)).priority == 3  # type: ignore[union-attr]
    for plaintext, priority in ((funded.plaintext, 0), (prioritised.plaintext.get_secret_value(), 3)):
        ctx = make_context()
        await service.before_request(ctx, make_request(bearer(plaintext)))
        assert (ctx.flow, ctx.priority) == (funded.account.id, priority)  # one account, one share
        finish(ctx, Usage(prompt_tokens=1, completion_tokens=1))
        await service.finalize(ctx)


async def test_tokens_per_minute_are_corrected_to_the_real_count(
    service: BillingService, store: LedgerStore
) -> None:
    funded = await make_key(store, tokens_per_minute=300)
    ctx = make_context(max_tokens=250)  # estimated about 270 tokens up front
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    error = await refused(service, make_context(max_tokens=250), bearer(funded.plaintext))
    assert error.status == 429
    finish(ctx, Usage(prompt_tokens=5, completion_tokens=5))
    await service.finalize(ctx)
    await service.before_request(make_context(max_tokens=250), make_request(bearer(funded.plaintext)))


async def test_finalize_never_raises_when_the_ledger_write_fails(
    service: BillingService,
    store: LedgerStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    funded = await make_key(store)
    ctx = make_context()
    await service.before_request(ctx, make_request(bearer(funded.plaintext)))
    finish(ctx, Usage(prompt_tokens=1, completion_tokens=1))

    async def broken(record: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(store, "settle", broken)
    with caplog.at_level(logging.ERROR, logger="worker.billing"):
        await service.finalize(ctx)
    assert any(r.getMessage() == "ledger write failed" for r in caplog.records)
    assert funded.plaintext not in caplog.text


async def test_the_key_never_appears_in_logs(
    service: BillingService, store: LedgerStore, caplog: pytest.LogCaptureFixture
) -> None:
    funded = await make_key(store, balance_micro=1)
    with caplog.at_level(logging.DEBUG):
        await refused(service, make_context(), bearer(funded.plaintext))
        ctx = make_context()
        await refused(service, ctx, bearer(funded.plaintext[:-1] + "A"))
    assert funded.plaintext not in caplog.text
    assert funded.plaintext[:-1] not in caplog.text


async def test_a_request_abandoned_while_reserving_leaves_nothing_held(
    service: BillingService, store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    funded = await make_key(store)
    reserved = asyncio.Event()
    real_reserve = store.reserve

    async def reserve_then_hang(reservation: Any) -> Any:
        outcome = await real_reserve(reservation)
        reserved.set()
        await asyncio.Event().wait()  # the answer never comes back: the caller gives up first
        return outcome

    monkeypatch.setattr(store, "reserve", reserve_then_hang)
    task = asyncio.create_task(service.before_request(make_context(), make_request(bearer(funded.plaintext))))
    await reserved.wait()
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def released() -> bool:
        account = await store.get_account(funded.account.id)
        return account is not None and account.reserved_micro == 0

    assert await eventually(released, timeout_s=10)


async def test_inference_requests_reuse_a_recent_key_lookup(service: BillingService, store: LedgerStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    funded = await make_key(store)
    lookups: list[str] = []
    find = store.find_key_by_hash

    async def counting_find(key_hash: str, *, settled: bool = False):  # type: ignore[no-untyped-def]
        lookups.append(key_hash)
        return await find(key_hash, settled=settled)

    monkeypatch.setattr(store, "find_key_by_hash", counting_find)
    for _ in range(3):
        await service.before_request(make_context(), make_request(bearer(funded.plaintext)))
    assert len(lookups) == 1
    # The key holder's own API always reads the key afresh.
    await service.keys.authenticate(make_request(bearer(funded.plaintext)).headers)
    assert len(lookups) == 2


async def test_a_burst_of_requests_with_one_key_reads_it_once(service: BillingService, store: LedgerStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    funded = await make_key(store)
    lookups: list[str] = []
    find = store.find_key_by_hash
    release = asyncio.Event()
    reading = asyncio.Event()

    async def slow_find(key_hash: str):  # type: ignore[no-untyped-def]
        lookups.append(key_hash)
        reading.set()
        await release.wait()  # every request of the burst arrives while the first read is in flight
        return await find(key_hash)

    monkeypatch.setattr(store, "find_key_by_hash", slow_find)
    headers = make_request(bearer(funded.plaintext)).headers
    burst = [asyncio.create_task(service.keys.authenticate(headers, recent_ok=True)) for _ in range(20)]
    # Tasks run in the order they were made: the read, started by the first request, runs after every request
    # of the burst had its turn to join it.
    await asyncio.wait_for(reading.wait(), timeout=10)
    burst[0].cancel()  # a client that hangs up does not take the shared read with it
    release.set()
    keys = await asyncio.gather(*burst[1:])

    assert len(lookups) == 1
    assert {key.id for key in keys} == {funded.key.id}
    assert burst[0].cancelled()
