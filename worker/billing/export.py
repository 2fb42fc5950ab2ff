"""Ledger records as the outside world sees them: JSON objects, JSON lines and CSV rows."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import orjson

from worker.billing.money import micro_to_usd_text
from worker.billing.store import LedgerStore
from worker.billing.store.records import LedgerFilter, LedgerRecord

ExportFormat = Literal["csv", "jsonl"]
MEDIA_TYPES: dict[str, str] = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
CSV_COLUMNS = (
    "seq",
    "record_id",
    "request_id",
    "received_at",
    "worker_id",
    "key_id",
    "account_id",
    "model",
    "endpoint",
    "replica_id",
    "gpu_uuids",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "usage_estimated",
    "cost_micro",
    "cost_usd",
    "status_code",
    "outcome",
    "finish_reason",
    "stream",
    "ttft_ms",
    "duration_ms",
    "gpu_seconds",
)
_PAGE = 1000


def record_json(record: LedgerRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    data["cost_usd"] = micro_to_usd_text(record.cost_micro)
    return {"object": "usage.record", **data}


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def csv_row(record: LedgerRecord) -> str:
    data = record_json(record)
    data["gpu_uuids"] = ",".join(record.gpu_uuids)
    return _csv_line(["" if data[column] is None else data[column] for column in CSV_COLUMNS])


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


async def export_lines(
    store: LedgerStore, where: LedgerFilter, export_format: ExportFormat
) -> AsyncIterator[str]:
    """Every matching record, oldest first, read page by page so exports of any size stream."""
    if export_format == "csv":
        yield csv_header()
    cursor: int | None = None
    while True:
        page = await store.query_ledger(where, limit=_PAGE, order="asc", cursor=cursor)
        for record in page:
            yield csv_row(record) if export_format == "csv" else orjson.dumps(record_json(record)).decode() + "\n"
        if len(page) < _PAGE:
            return
        cursor = page[-1].seq
