"""SQLite's ledger journal: records kept by a file append, settled in batches, and after a crash at the
next start of the same worker id, each exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.billing.support import ledger_entry, make_key
from tests.billing.test_ledger_store import reservation
from worker.billing.store import DuplicateRecordId, LedgerStore, open_store
from worker.billing.store.records import LedgerFilter, ReserveOutcome
from worker.billing.store.sql import ledger_params

WORKER = "worker-1"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def journaled(db_path: Path) -> AsyncIterator[LedgerStore]:
    store = await open_store(f"sqlite:///{db_path}")
    await store.start_journal(WORKER)
    try:
        yield store
    finally:
        await store.close()


def journal_files(db_path: Path) -> list[Path]:
    return sorted((db_path.parent / "ledger.db.journal" / WORKER).glob("*.jsonl"))


def write_journal(db_path: Path, name: str, lines: list[bytes]) -> None:
    directory = db_path.parent / "ledger.db.journal" / WORKER
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"".join(line + b"\n" for line in lines))


async def test_a_journaled_record_is_kept_before_its_commit_and_settled_in_a_batch(
    journaled: LedgerStore, db_path: Path
) -> None:
    funded = await make_key(journaled, balance_micro=1_000)
    holds = [reservation(funded.key, 100) for _ in range(5)]
    for held in holds:
        assert await journaled.reserve(held) is ReserveOutcome.reserved

    settling = [
        await journaled.settle_soon(ledger_entry(held.record_id, key=funded.key, cost=10 + i))
        for i, held in enumerate(holds)
    ]
    # Returned before the commit: the records are in the journal, not yet in the database.
    assert not any(future.done() for future in settling)
    assert journaled.pending_writes == 5
    (file,) = journal_files(db_path)
    assert [orjson.loads(line)[0] for line in file.read_bytes().splitlines()] == [h.record_id for h in holds]

    seqs = await asyncio.gather(*settling)
    assert seqs == list(range(seqs[0], seqs[0] + 5))  # one batch
    assert journal_files(db_path) == []  # its file goes once the batch has committed
    account = await journaled.get_account(funded.account.id)
    assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000 - 60, 0)


async def test_a_read_sees_every_record_settled_before_it(journaled: LedgerStore) -> None:
    funded = await make_key(journaled, balance_micro=1_000)
    held = reservation(funded.key, 100)
    assert await journaled.reserve(held) is ReserveOutcome.reserved
    settling = await journaled.settle_soon(ledger_entry(held.record_id, key=funded.key, cost=42))

    records = await journaled.query_ledger(LedgerFilter(key_id=funded.key.id), limit=10)
    assert [r.record_id for r in records] == [held.record_id]
    assert settling.done() and settling.result() == records[0].seq
    account = await journaled.get_account(funded.account.id)
    assert account is not None and account.balance_micro == 958


async def test_a_duplicate_in_a_journaled_batch_fails_alone(journaled: LedgerStore) -> None:
    await journaled.settle(ledger_entry("rec-dup"))
    settling = [
        await journaled.settle_soon(ledger_entry(record_id)) for record_id in ("rec-a", "rec-dup", "rec-b")
    ]
    results = await asyncio.gather(*settling, return_exceptions=True)
    assert isinstance(results[1], DuplicateRecordId)
    assert all(isinstance(seq, int) for seq in (results[0], results[2]))
    recorded = [r.record_id for r in await journaled.query_ledger(LedgerFilter(), limit=10, order="asc")]
    assert recorded == ["rec-dup", "rec-a", "rec-b"]


async def test_the_journal_left_by_a_killed_worker_is_settled_at_its_next_start(db_path: Path) -> None:
    store = await open_store(f"sqlite:///{db_path}")
    funded = await make_key(store, balance_micro=1_000)
    held = reservation(funded.key, 300, holder=WORKER)
    assert await store.reserve(held) is ReserveOutcome.reserved
    committed = ledger_entry("rec-committed", key=funded.key, cost=5)
    await store.settle(committed)
    await store.close()
    # As a killed worker leaves it: a record it only journaled, one whose batch had committed but whose
    # file was not yet removed, and a line torn by a machine crash.
    journaled = ledger_entry(held.record_id, key=funded.key, cost=70)
    write_journal(db_path, "000000000007.jsonl", [orjson.dumps(ledger_params(committed))])
    write_journal(
        db_path, "000000000008.jsonl", [orjson.dumps(ledger_params(journaled)), b'["rec-torn", "re']
    )

    store = await open_store(f"sqlite:///{db_path}")
    try:
        assert await store.start_journal(WORKER) == 1
        assert journal_files(db_path) == []
        recorded = [r.record_id for r in await store.query_ledger(LedgerFilter(), limit=10, order="asc")]
        assert recorded == ["rec-committed", held.record_id]
        account = await store.get_account(funded.account.id)
        # Each charged once; the journaled record's reservation released as it was charged.
        assert account is not None and (account.balance_micro, account.reserved_micro) == (1_000 - 75, 0)
        # New files continue the numbering, so they sort after any that are left.
        await store.settle_soon(ledger_entry("rec-new"))
        assert [p.name for p in journal_files(db_path)] == ["000000000009.jsonl"]
    finally:
        await store.close()
    assert journal_files(db_path) == []


async def test_another_worker_ids_journal_is_left_to_it(db_path: Path) -> None:
    write_journal(db_path, "000000000001.jsonl", [orjson.dumps(ledger_params(ledger_entry("rec-1")))])
    store = await open_store(f"sqlite:///{db_path}")
    try:
        assert await store.start_journal("worker-2") == 0
        assert await store.query_ledger(LedgerFilter(), limit=10) == []
        assert len(journal_files(db_path)) == 1
    finally:
        await store.close()


async def test_with_synchronous_full_records_are_committed_before_settle_soon_returns(db_path: Path) -> None:
    store = await open_store(f"sqlite:///{db_path}", sqlite_synchronous="full")
    try:
        assert await store.start_journal(WORKER) == 0
        settled = await store.settle_soon(ledger_entry("rec-1"))
        assert settled.done() and isinstance(settled.result(), int)
        assert not (db_path.parent / "ledger.db.journal").exists()
    finally:
        await store.close()


async def test_a_store_closed_with_journaled_records_commits_them(db_path: Path) -> None:
    store = await open_store(f"sqlite:///{db_path}")
    await store.start_journal(WORKER)
    settling = await store.settle_soon(ledger_entry("rec-1"))
    await store.close()
    assert isinstance(settling.result(), int)
    assert journal_files(db_path) == []
    reopened = await open_store(f"sqlite:///{db_path}")
    try:
        assert [r.record_id for r in await reopened.query_ledger(LedgerFilter(), limit=10)] == ["rec-1"]
    finally:
        await reopened.close()
