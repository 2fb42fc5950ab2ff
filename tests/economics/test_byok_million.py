"""The BYOK fee at OpenRouter's real allowance: the 1,000,001st BYOK request of an account's month is the
first that pays. The month's first 999,999 records are written by one INSERT ... SELECT beside the store
(a million settles would take minutes), on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import asyncpg

from tests.billing.support import make_key
from tests.economics.support import T0, UNTIL, entry, node_config
from worker.billing.store import LedgerStore
from worker.billing.store.records import to_epoch
from worker.economics.queries import BYOK_FREE_REQUESTS_PER_MONTH
from worker.economics.report import economics_report

# Records numbered 0 .. count - 1 ({0}: the numbers), one a millisecond from the month's start ({1}).
_BULK = """
INSERT INTO ledger (record_id, request_id, worker_id, key_id, account_id, model, endpoint, gpu_uuids,
    prompt_tokens, completion_tokens, cached_tokens, usage_estimated, cost_micro, status_code, outcome, stream,
    received_at, duration_ms)
SELECT 'bulk-' || n, 'bulk-' || n, 'node-1', {key}, {account}, 'acme/chat', 'chat.completions', '', 10, 5, 0,
    {false}, 1000, 200, 'ok', {false}, {start} + n / 1000.0, 1.0
FROM {numbers}"""


async def test_the_fee_starts_at_the_first_request_past_a_million(store: LedgerStore, db_url: str) -> None:
    byok = await make_key(store, byok=True)
    month_start = to_epoch(datetime(2026, 11, 1, tzinfo=UTC))
    before_the_window = BYOK_FREE_REQUESTS_PER_MONTH - 1
    values = {"key": f"'{byok.key.id}'", "account": f"'{byok.account.id}'", "start": month_start}
    if db_url.startswith("sqlite"):
        last = before_the_window - 1
        numbers = f"(WITH RECURSIVE c(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM c WHERE n < {last}) SELECT n FROM c)"
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            connection.execute(_BULK.format(numbers=numbers, false="0", **values))
    else:
        connection = await asyncpg.connect(db_url)
        try:
            numbers = f"generate_series(0, {before_the_window - 1}) AS n"
            await connection.execute(_BULK.format(numbers=numbers, false="FALSE", **values))
        finally:
            await connection.close()
    # In the window: the millionth (still free) and the 1,000,001st (5% of its 400 micro-USD).
    await store.settle(entry("millionth", T0 + 1, 10, 5, 300, 0.0, key=byok.key))
    await store.settle(entry("past-the-allowance", T0 + 2, 10, 5, 400, 0.0, key=byok.key))

    report = await economics_report(store, node_config(), datetime.fromtimestamp(T0, UTC), UNTIL)
    chat = next(m for m in report.models if m.model == "acme/chat")
    assert (chat.requests, chat.revenue_usd, chat.openrouter_byok_fee_usd) == (2, "0.000700", "0.00002000")
