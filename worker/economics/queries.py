"""What the economics read from the billing database, through the store's read-only queries.

Every query runs unchanged on SQLite and PostgreSQL but one expression: the time bucket of a record.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from worker.billing.store import LedgerStore
from worker.billing.store.records import ReplicaUptime

# OpenRouter's BYOK fee: a share of each request's cost once an account's BYOK requests of the calendar
# month (UTC) pass a free allowance.
BYOK_FREE_REQUESTS_PER_MONTH = 1_000_000


class ModelTotals(NamedTuple):
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    revenue_micro: int
    gpu_seconds: float


class Bucket(NamedTuple):
    """One model's records received in one time bucket, which starts at `start` (epoch seconds)."""

    model: str
    start: float
    tokens: int  # prompt and completion
    revenue_micro: int
    gpu_seconds: float


_TOTALS = """
SELECT model, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(cached_tokens) AS cached_tokens,
    SUM(completion_tokens) AS completion_tokens, SUM(cost_micro) AS revenue_micro, SUM(gpu_seconds) AS gpu_seconds
FROM ledger WHERE received_at >= {} AND received_at < {}/*worker*/ GROUP BY model"""

_BUCKETS = """
SELECT model, {bucket} AS bucket, SUM(prompt_tokens + completion_tokens) AS tokens,
    SUM(cost_micro) AS revenue_micro, SUM(gpu_seconds) AS gpu_seconds
FROM ledger WHERE received_at >= {{}} AND received_at < {{}}/*worker*/ GROUP BY model, {bucket}"""

_UPTIME = """
SELECT worker_id, replica_id, started_at, model, gpus, ready_at, stopped_at, seen_at FROM replica_uptime
WHERE started_at < {} AND COALESCE(stopped_at, seen_at) > {}/*worker*/ ORDER BY started_at, replica_id"""

# Each BYOK request of the month numbered per account, in the order received; those past the allowance
# and inside the window pay the fee. The numbering starts at the month's start whatever the window, and
# counts the account's requests on every worker.
_BYOK_FEE_BASE = """
SELECT model, SUM(cost_micro) AS cost_micro FROM (
    SELECT ledger.model, ledger.cost_micro, ledger.received_at, ledger.worker_id,
        ROW_NUMBER() OVER (PARTITION BY ledger.account_id ORDER BY ledger.received_at, ledger.seq) AS number
    FROM ledger JOIN api_keys ON api_keys.id = ledger.key_id
    WHERE api_keys.byok AND ledger.received_at >= {} AND ledger.received_at < {}
) AS numbered WHERE number > {} AND received_at >= {}/*worker*/ GROUP BY model"""


def _scoped(template: str, worker_id: str | None, *params: Any) -> tuple[Any, ...]:
    """The query and its parameters (`read_only`'s arguments) for every worker in the database, or only for
    `worker_id`'s records and replicas."""
    if worker_id is None:
        return template.replace("/*worker*/", ""), *params
    return template.replace("/*worker*/", " AND worker_id = {}"), *params, worker_id


def _bucket_sql(dialect: str, width_s: int) -> str:
    """The record's bucket number: whole `width_s` periods since the epoch (CAST rounds on PostgreSQL)."""
    if dialect == "sqlite":
        return f"CAST(received_at / {int(width_s)} AS INTEGER)"
    return f"FLOOR(received_at / {int(width_s)})"


async def model_totals(
    store: LedgerStore, since: float, until: float, worker_id: str | None = None
) -> dict[str, ModelTotals]:
    rows = await store.read_only(*_scoped(_TOTALS, worker_id, since, until))
    return {
        row["model"]: ModelTotals(
            int(row["requests"]), int(row["prompt_tokens"]), int(row["cached_tokens"]),
            int(row["completion_tokens"]), int(row["revenue_micro"]), float(row["gpu_seconds"]),
        )
        for row in rows
    }


async def model_buckets(
    store: LedgerStore, since: float, until: float, width_s: int, worker_id: str | None = None
) -> list[Bucket]:
    sql = _BUCKETS.format(bucket=_bucket_sql(store.dialect, width_s))
    rows = await store.read_only(*_scoped(sql, worker_id, since, until))
    return sorted(
        Bucket(row["model"], float(int(row["bucket"]) * width_s), int(row["tokens"]), int(row["revenue_micro"]),
               float(row["gpu_seconds"]))
        for row in rows
    )


async def uptime_runs(
    store: LedgerStore, since: float, until: float, worker_id: str | None = None
) -> list[ReplicaUptime]:
    """Every replica run that overlaps [since, until)."""
    rows = await store.read_only(*_scoped(_UPTIME, worker_id, until, since))
    return [_run(row) for row in rows]


def _run(row: Mapping[str, Any]) -> ReplicaUptime:
    return ReplicaUptime(
        row["worker_id"], row["replica_id"], float(row["started_at"]), row["model"], int(row["gpus"]),
        None if row["ready_at"] is None else float(row["ready_at"]),
        None if row["stopped_at"] is None else float(row["stopped_at"]), float(row["seen_at"]),
    )


async def byok_fee_base(
    store: LedgerStore, since: float, until: float, worker_id: str | None = None, *,
    allowance: int = BYOK_FREE_REQUESTS_PER_MONTH,
) -> dict[str, int]:
    """Per model, the cost (micro-USD) of the window's BYOK requests past each account's monthly allowance."""
    totals: dict[str, int] = {}
    for month_start, month_end in months(since, until):
        rows = await store.read_only(*_scoped(_BYOK_FEE_BASE, worker_id, month_start, min(month_end, until),
                                              allowance, max(since, month_start)))
        for row in rows:
            totals[row["model"]] = totals.get(row["model"], 0) + int(row["cost_micro"])
    return totals


def months(since: float, until: float) -> list[tuple[float, float]]:
    """The calendar months (UTC) that [since, until) touches, each as [start, end) in epoch seconds."""
    start = datetime.fromtimestamp(since, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spans: list[tuple[float, float]] = []
    while start.timestamp() < until:
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        spans.append((start.timestamp(), end.timestamp()))
        start = end
    return spans
