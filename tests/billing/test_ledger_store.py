"""The billing store, on SQLite and on PostgreSQL alike: migrations, keys, reservations, the ledger."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from tests.billing.support import insert_raw_row, ledger_entry, make_key, store_at_schema_version
from worker.billing.keys import issue_key
from worker.billing.store import (
    LATEST_VERSION,
    DuplicateRecordId,
    LedgerStore,
    SchemaTooNew,
    UnknownAccount,
    open_store,
)
from worker.billing.store.records import (
    ApiKey,
    KeyLimits,
    LedgerFilter,
    Reservation,
    ReserveOutcome,
    WorkerClaim,
    utc_month,
)


def reservation(
    key: ApiKey,
    amount: int,
    *,
    holder: str = "worker-1",
    record_id: str | None = None,
    created_at: float | None = None,
) -> Reservation:
    now = time.time() if created_at is None else created_at
    return Reservation(
        record_id=record_id or f"rec-{uuid.uuid4().hex}",
        account_id=key.account_id,
        key_id=key.id,
        amount_micro=amount,
        holder=holder,
        month=utc_month(now),
        created_at=now,
    )


async def test_migrations_are_recorded_and_reopening_is_harmless(db_url: str) -> None:
    first = await open_store(db_url)
    funded = await make_key(first)
    await first.close()
    second = await open_store(db_url)
    try:
        assert (await second.get_key(funded.key.id)) == funded.key
    finally:
        await second.close()
    assert LATEST_VERSION >= 1


async def test_accounts_and_top_ups(store: LedgerStore) -> None:
    account = await store.create_account("acct_1", "acme", 5_000_000, time.time())
    assert account.balance_micro == 5_000_000 and account.reserved_micro == 0
    topped = await store.top_up("acct_1", 1_500_000)
    assert topped.balance_micro == 6_500_000
    assert [a.id for a in await store.list_accounts()] == ["acct_1"]
    with pytest.raises(UnknownAccount):
        await store.top_up("acct_missing", 1)


async def test_keys_are_found_by_hash_and_revoked_once(store: LedgerStore) -> None:
    funded = await make_key(
        store,
        allowed_models=("acme/chat",),
        requests_per_minute=5,
        tokens_per_minute=900,
        monthly_spend_cap_micro=2_000_000,
    )
    found = await store.find_key_by_hash(funded.key.key_hash)
    assert found == funded.key
    assert found.limits.allowed_models == ("acme/chat",)
    assert found.limits.requests_per_minute == 5 and found.limits.tokens_per_minute == 900
    assert await store.find_key_by_hash("0" * 64) is None
    assert [k.id for k in await store.list_keys(funded.account.id)] == [funded.key.id]
    assert await store.list_keys("acct_other") == []

    revoked = await store.revoke_key(funded.key.id, 1000.0)
    assert revoked is not None and revoked.revoked_at is not None
    again = await store.revoke_key(funded.key.id, 2000.0)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert await store.revoke_key("key_missing", 1.0) is None


async def test_a_key_needs_an_existing_account(store: LedgerStore) -> None:
    with pytest.raises(UnknownAccount):
        await issue_key(store, account_id="acct_missing", name="x", limits=KeyLimits())
    assert await store.list_keys() == []


async def test_reserve_then_settle_charges_the_real_cost(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    held = reservation(funded.key, 400)
    assert await store.reserve(held) is ReserveOutcome.reserved
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 400 and account.available_micro == 600

    seq = await store.settle(ledger_entry(held.record_id, key=funded.key, cost=123))
    assert [r.seq for r in await store.query_ledger(LedgerFilter(), limit=10)] == [seq]
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (877, 0)
    key = await store.get_key(funded.key.id)
    assert key is not None and key.reserved_micro == 0
    assert key.spent_in(utc_month(time.time())) == 123


async def test_concurrent_reservations_never_overdraw(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    outcomes = await asyncio.gather(*(store.reserve(reservation(funded.key, 100)) for _ in range(50)))
    assert outcomes.count(ReserveOutcome.reserved) == 10
    assert outcomes.count(ReserveOutcome.insufficient_balance) == 40
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 1_000 and account.available_micro == 0


async def test_two_workers_sharing_the_database_never_overdraw(store: LedgerStore, db_url: str) -> None:
    funded = await make_key(store, balance_micro=1_000)
    other_worker = await open_store(db_url)
    try:
        outcomes = await asyncio.gather(
            *(
                (store if i % 2 else other_worker).reserve(
                    reservation(funded.key, 100, holder=f"worker-{i % 2}")
                )
                for i in range(50)
            )
        )
    finally:
        await other_worker.close()
    assert outcomes.count(ReserveOutcome.reserved) == 10


async def test_monthly_spend_cap_counts_spent_and_reserved(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=10_000, monthly_spend_cap_micro=500)
    first = reservation(funded.key, 300)
    assert await store.reserve(first) is ReserveOutcome.reserved
    assert await store.reserve(reservation(funded.key, 300)) is ReserveOutcome.spend_cap_reached
    await store.settle(ledger_entry(first.record_id, key=funded.key, cost=250))
    assert await store.reserve(reservation(funded.key, 250)) is ReserveOutcome.reserved
    assert await store.reserve(reservation(funded.key, 1)) is ReserveOutcome.spend_cap_reached


async def test_a_late_charge_for_last_month_does_not_reset_this_month(store: LedgerStore) -> None:
    funded = await make_key(store)
    now = datetime.now(UTC)
    await store.settle(ledger_entry("req-now", key=funded.key, cost=100, received_at=now))
    await store.settle(ledger_entry("req-old", key=funded.key, cost=7, received_at=now - timedelta(days=40)))
    key = await store.get_key(funded.key.id)
    assert key is not None and key.spent_in(utc_month(now.timestamp())) == 100


async def test_revoked_key_cannot_reserve(store: LedgerStore) -> None:
    funded = await make_key(store)
    await store.revoke_key(funded.key.id, time.time())
    assert await store.reserve(reservation(funded.key, 1)) is ReserveOutcome.key_revoked


async def test_a_record_is_settled_once(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    held = reservation(funded.key, 100, record_id="rec-same")
    assert await store.reserve(held) is ReserveOutcome.reserved
    # Record ids come from the worker and never repeat; one that did is an error, and holds nothing more.
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await store.reserve(reservation(funded.key, 100, record_id="rec-same"))
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 100
    key = await store.get_key(funded.key.id)
    assert key is not None and key.reserved_micro == 100

    await store.settle(ledger_entry("rec-same", key=funded.key, cost=10))
    with pytest.raises(DuplicateRecordId):
        await store.settle(ledger_entry("rec-same", key=funded.key, cost=10))
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (990, 0)
    assert await store.count_ledger(LedgerFilter()) == 1


async def test_an_entry_reads_back_as_the_record_it_describes(store: LedgerStore) -> None:
    funded = await make_key(store)
    moment = datetime(2026, 11, 27, 12, 30, 15, 250000, tzinfo=UTC)
    entry = ledger_entry("rec-round-trip", key=funded.key, cost=321, received_at=moment)
    seq = await store.settle(entry)
    (record,) = await store.query_ledger(LedgerFilter(request_id=entry.request_id), limit=10)
    assert record.seq == seq
    assert record.received_at == moment
    written = entry._asdict()
    del written["received_at"]
    assert record.model_dump(exclude={"seq", "received_at"}) == written


async def test_a_duplicate_or_a_failing_write_among_concurrent_ones_fails_alone(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=10_000)
    held = [reservation(funded.key, 100) for _ in range(6)]
    for r in held:
        assert await store.reserve(r) is ReserveOutcome.reserved
    await store.settle(ledger_entry(held[0].record_id, key=funded.key, cost=10))
    # Written together: one record already in the ledger, one twice, and a write that fails.
    records = [ledger_entry(r.record_id, key=funded.key, cost=10) for r in held] + [
        ledger_entry(held[1].record_id, key=funded.key, cost=10)
    ]
    outcomes = await asyncio.gather(
        *(store.settle(record) for record in records[:3]),
        store.top_up("no-such-account", 5),
        *(store.settle(record) for record in records[3:]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], DuplicateRecordId) and isinstance(outcomes[3], UnknownAccount)
    assert sum(isinstance(outcome, DuplicateRecordId) for outcome in outcomes) == 2
    assert sum(isinstance(outcome, int) for outcome in outcomes) == 5
    assert await store.count_ledger(LedgerFilter()) == 6
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (10_000 - 60, 0)


async def test_request_ids_may_repeat_and_find_every_record(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    first = reservation(funded.key, 100)
    second = reservation(funded.key, 100)
    assert await store.reserve(first) is ReserveOutcome.reserved
    assert await store.reserve(second) is ReserveOutcome.reserved
    await store.settle(ledger_entry(first.record_id, request_id="client-id", key=funded.key, cost=10))
    await store.settle(ledger_entry(second.record_id, request_id="client-id", key=funded.key, cost=20))
    await store.settle(ledger_entry("rec-other", request_id="other-id", key=funded.key, cost=1))

    found = await store.query_ledger(LedgerFilter(request_id="client-id"), limit=10, order="asc")
    assert [(r.record_id, r.request_id) for r in found] == [
        (first.record_id, "client-id"),
        (second.record_id, "client-id"),
    ]
    assert await store.count_ledger(LedgerFilter(request_id="client-id", key_id=funded.key.id)) == 2
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (969, 0)


async def test_concurrent_settles_are_batched_and_all_recorded(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=100_000)
    held = [reservation(funded.key, 100) for _ in range(40)]
    assert set(await asyncio.gather(*(store.reserve(r) for r in held))) == {ReserveOutcome.reserved}
    seqs = await asyncio.gather(
        *(store.settle(ledger_entry(r.record_id, key=funded.key, cost=7)) for r in held)
    )
    recorded = {r.record_id: r.seq for r in await store.query_ledger(LedgerFilter(), limit=100)}
    assert recorded == {r.record_id: seq for r, seq in zip(held, seqs, strict=True)}
    assert len(set(seqs)) == 40
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (100_000 - 280, 0)


async def test_the_ledger_is_append_only(store: LedgerStore, db_url: str) -> None:
    await store.settle(ledger_entry("req-1", cost=5))
    if db_url.startswith("sqlite"):
        path = db_url[len("sqlite:///") :]
        with sqlite3.connect(path) as connection, pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("UPDATE ledger SET cost_micro = 0")
        with sqlite3.connect(path) as connection, pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("DELETE FROM ledger")
    else:
        connection = await asyncpg.connect(db_url)
        try:
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute("UPDATE ledger SET cost_micro = 0")
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute("DELETE FROM ledger")
        finally:
            await connection.close()


async def test_restarted_worker_releases_what_it_held(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    assert await store.reserve(reservation(funded.key, 300, holder="worker-1")) is ReserveOutcome.reserved
    assert await store.reserve(reservation(funded.key, 200, holder="worker-2")) is ReserveOutcome.reserved
    old = reservation(funded.key, 100, holder="worker-3", created_at=time.time() - 7200)
    assert await store.reserve(old) is ReserveOutcome.reserved

    assert await store.release_reservations("worker-1", older_than=time.time() - 3600) == 2
    account = await store.get_account(funded.account.id)
    assert account is not None and account.reserved_micro == 200
    key = await store.get_key(funded.key.id)
    assert key is not None and key.reserved_micro == 200
    # Settling a request whose reservation was released charges it and releases nothing more.
    await store.settle(ledger_entry(old.record_id, key=funded.key, cost=50))
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (950, 200)


async def test_query_filters_and_pages(store: LedgerStore) -> None:
    funded = await make_key(store)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    for i in range(7):
        await store.settle(
            ledger_entry(
                f"req-{i}",
                key=funded.key,
                cost=i,
                model="a" if i % 2 else "b",
                received_at=base + timedelta(hours=i),
            )
        )
    await store.settle(ledger_entry("req-other", cost=1, worker_id="worker-2", received_at=base))

    newest = await store.query_ledger(LedgerFilter(key_id=funded.key.id), limit=3)
    assert [r.record_id for r in newest] == ["req-6", "req-5", "req-4"]
    older = await store.query_ledger(LedgerFilter(key_id=funded.key.id), limit=3, cursor=newest[-1].seq)
    assert [r.record_id for r in older] == ["req-3", "req-2", "req-1"]
    oldest_first = await store.query_ledger(LedgerFilter(), limit=100, order="asc")
    assert [r.record_id for r in oldest_first] == [f"req-{i}" for i in range(7)] + ["req-other"]

    window = LedgerFilter(since=base + timedelta(hours=2), until=base + timedelta(hours=5), model="a")
    assert [r.record_id for r in await store.query_ledger(window, limit=10, order="asc")] == ["req-3"]
    by_request_id = LedgerFilter(request_id="client-req-2")
    assert [r.record_id for r in await store.query_ledger(by_request_id, limit=10)] == ["req-2"]
    assert await store.count_ledger(LedgerFilter(worker_id="worker-1")) == 7
    assert await store.count_ledger(LedgerFilter(worker_id="worker-1"), after_seq=newest[0].seq or 0) == 0

    record = newest[0]
    assert (record.record_id, record.request_id) == ("req-6", "client-req-6")
    assert record.gpu_uuids == ("GPU-a", "GPU-b") and record.stream is True and record.ttft_ms == 12.5
    assert record.received_at == base + timedelta(hours=6)


async def test_outbox_cursor_only_moves_forward(store: LedgerStore) -> None:
    assert await store.outbox_cursor("worker-1") == 0
    await store.advance_outbox("worker-1", 5, time.time())
    await store.advance_outbox("worker-1", 3, time.time())
    assert await store.outbox_cursor("worker-1") == 5
    assert await store.outbox_cursor("worker-2") == 0


async def test_one_reservation_can_be_dropped_without_a_charge(store: LedgerStore) -> None:
    funded = await make_key(store, balance_micro=1_000)
    held = reservation(funded.key, 300)
    assert await store.reserve(held) is ReserveOutcome.reserved
    assert await store.release_reservation(held.record_id) is True
    assert await store.release_reservation(held.record_id) is False
    account = await store.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000, 0)


_WRITER = """
import asyncio, sys
from tests.billing.support import ledger_entry
from worker.billing.store import open_store

async def main():
    store = await open_store(sys.argv[1], sqlite_synchronous=sys.argv[2])
    journal = sys.argv[3] == "journal"
    if journal:
        await store.start_journal("worker-1")
    batch = 0
    while True:
        ids = [f"rec-{batch}-{i}" for i in range(8)]
        if journal:  # acknowledged: each record above is journaled (SQLite) or committed
            await asyncio.gather(*(store.settle_soon(ledger_entry(record_id)) for record_id in ids))
        else:  # acknowledged: each write above has committed
            await asyncio.gather(*(store.settle(ledger_entry(record_id)) for record_id in ids))
        print(*ids, sep="\\n", flush=True)
        batch += 1

asyncio.run(main())
"""


@pytest.mark.parametrize("acknowledged_when", ["committed", "journal"])
async def test_acknowledged_records_survive_sigkill(db_url: str, acknowledged_when: str) -> None:
    # SQLite's weaker setting: with synchronous=NORMAL a killed process still loses nothing committed,
    # nor anything journaled, once the next worker with its id has started.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WRITER,
        db_url,
        "normal",
        acknowledged_when,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    acknowledged: list[str] = []
    try:
        assert process.stdout is not None
        while len(acknowledged) < 200:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
            assert line, "the writer process ended early"
            acknowledged.append(line.decode().strip())
    finally:
        process.kill()
        await process.wait()
    store = await open_store(db_url)
    try:
        await store.start_journal("worker-1")
        recorded = [r.record_id for r in await store.query_ledger(LedgerFilter(), limit=100_000)]
    finally:
        await store.close()
    assert set(acknowledged) <= set(recorded)
    assert len(recorded) == len(set(recorded))


async def test_a_database_from_a_newer_worker_is_refused(db_url: str) -> None:
    await (await open_store(db_url)).close()
    statement = "INSERT INTO schema_version VALUES (999, 'from the future', 0)"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url[len("sqlite:///") :]) as connection:
            connection.execute(statement)
    else:
        connection = await asyncpg.connect(db_url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()
    with pytest.raises(SchemaTooNew):
        await open_store(db_url)


def claim(instance_id: str, now: float, worker_id: str = "worker-1") -> WorkerClaim:
    return WorkerClaim(worker_id=worker_id, instance_id=instance_id, host="node-a", pid=4321,
                       process_started_at=now - 5, claimed_at=now, seen_at=now)


async def test_a_worker_id_is_held_by_one_running_worker(store: LedgerStore) -> None:
    assert await store.claim_worker_id(claim("first", 1000.0), stale_before=970.0) is None
    # Another instance is refused while the holder renews, and learns who holds the id.
    assert await store.renew_worker_claim("worker-1", "first", now=1010.0)
    holder = await store.claim_worker_id(claim("second", 1020.0), stale_before=990.0)
    assert holder == claim("first", 1000.0).model_copy(update={"seen_at": 1010.0})
    # Other ids are free, and the holder may claim its own again.
    assert await store.claim_worker_id(claim("second", 1020.0, worker_id="worker-2"), stale_before=990.0) is None
    assert await store.claim_worker_id(claim("first", 1030.0), stale_before=1000.0) is None
    # A holder known to be gone gives it up at once; the claim names only that one.
    assert (await store.claim_worker_id(claim("second", 1040.0), stale_before=1010.0, gone_instance="x")) is not None
    assert await store.claim_worker_id(claim("second", 1040.0), stale_before=1010.0, gone_instance="first") is None
    assert await store.claim_worker_id(claim("first", 1050.0), stale_before=1020.0, gone_instance="second") is None
    # A holder that stopped renewing (killed) loses the id to the next one, and hears of it.
    assert await store.claim_worker_id(claim("second", 1100.0), stale_before=1070.0) is None
    assert not await store.renew_worker_claim("worker-1", "first", now=1101.0)
    # Releasing someone else's claim does nothing; releasing one's own frees the id at once.
    await store.release_worker_claim("worker-1", "first")
    assert (await store.claim_worker_id(claim("third", 1102.0), stale_before=1072.0)) is not None
    await store.release_worker_claim("worker-1", "second")
    assert await store.claim_worker_id(claim("third", 1103.0), stale_before=1073.0) is None


async def test_a_version_1_database_is_migrated_to_hold_worker_claims(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with store_at_schema_version(db_url, 1, monkeypatch) as old:
        account = await old.create_account("acct_v1", "acme", 1_000_000, time.time())
    # A key as version 1 stored it: the columns it had then.
    row = ("key_v1", account.id, "old", "iow_old", "hash-v1", "[]", None, None, None, False, time.time(), None)
    await insert_raw_row(db_url, "api_keys", ("id", "account_id", "name", "prefix", "key_hash", "allowed_models",
                                               "rpm_limit", "tpm_limit", "monthly_cap_micro", "byok", "created_at",
                                               "expires_at"), row)

    store = await open_store(db_url)
    try:
        key = await store.get_key("key_v1")
        assert key is not None and (key.account_id, key.name, key.priority) == (account.id, "old", 0)
        assert await store.claim_worker_id(claim("first", 1000.0), stale_before=970.0) is None
    finally:
        await store.close()
