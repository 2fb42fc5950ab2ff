"""The ledger's GPU-seconds column: written and read on both databases, 0 for records from before it."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import orjson
import pytest

from tests.billing.support import insert_raw_row, ledger_entry, make_context, store_at_schema_version
from tests.billing.test_ledger_journal import WORKER, write_journal
from worker.billing.export import csv_header, csv_row, record_json
from worker.billing.service import ledger_entry as metered_entry
from worker.billing.store import LedgerStore, open_store
from worker.billing.store.records import LedgerFilter
from worker.billing.store.sql import ledger_params


async def test_gpu_seconds_are_stored_and_read_back(store: LedgerStore) -> None:
    await store.settle(ledger_entry("rec-gpu", gpu_seconds=2.75))
    (record,) = await store.query_ledger(LedgerFilter(), limit=1)
    assert record.gpu_seconds == 2.75


async def test_records_from_before_the_column_read_zero_gpu_seconds(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with store_at_schema_version(db_url, 5, monkeypatch):
        pass
    # A record as version 5 stored it: every column but gpu_seconds.
    entry = ledger_entry("rec-v5")
    names = [name for name in entry._fields if name != "gpu_seconds"]
    values = [v for name, v in zip(entry._fields, ledger_params(entry), strict=True) if name != "gpu_seconds"]
    await insert_raw_row(db_url, "ledger", names, values)

    store = await open_store(db_url)
    try:
        (record,) = await store.query_ledger(LedgerFilter(), limit=10)
        assert (record.record_id, record.gpu_seconds, record.prompt_tokens) == ("rec-v5", 0.0, 10)
    finally:
        await store.close()


async def test_a_journal_line_from_before_the_column_settles_with_zero_gpu_seconds(tmp_path: Path) -> None:
    db_path = tmp_path / "ledger.db"
    line = ledger_params(ledger_entry("rec-old-journal", gpu_seconds=9.0))[:-1]  # as an older worker wrote it
    write_journal(db_path, "000000000001.jsonl", [orjson.dumps(line)])
    store = await open_store(f"sqlite:///{db_path}")
    try:
        assert await store.start_journal(WORKER) == 1
        (record,) = await store.query_ledger(LedgerFilter(), limit=10)
        assert (record.record_id, record.gpu_seconds) == ("rec-old-journal", 0.0)
    finally:
        await store.close()


def test_the_billing_hook_copies_the_requests_gpu_seconds() -> None:
    ctx = make_context()
    ctx.received_at = time.time()
    assert metered_entry(ctx, None, worker_id="w", gpu_uuids=()).gpu_seconds == 0.0
    ctx.gpu_seconds = 1.5
    assert metered_entry(ctx, None, worker_id="w", gpu_uuids=()).gpu_seconds == 1.5


async def test_exports_list_each_records_gpu_seconds(store: LedgerStore) -> None:
    await store.settle(ledger_entry("rec-export", gpu_seconds=0.125))
    (record,) = await store.query_ledger(LedgerFilter(), limit=1)
    assert record_json(record)["gpu_seconds"] == 0.125
    header, row = next(csv.reader([csv_header()])), next(csv.reader([csv_row(record)]))
    assert dict(zip(header, row, strict=True))["gpu_seconds"] == "0.125"
