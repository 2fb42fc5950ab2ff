"""Helpers for billing tests: funded keys, models, request contexts and hand-built requests."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from starlette.requests import Request

from worker.billing.disclosure import DisclosureHook, ProvenanceCache
from worker.billing.keys import issue_key, open_account
from worker.billing.provenance import Provenance
from worker.billing.store import LedgerStore, open_store, schema
from worker.billing.store.records import Account, ApiKey, KeyLimits, LedgerEntry, to_epoch
from worker.config import EngineKind, ModelConfig, Pricing
from worker.gateway.context import RequestContext


@dataclass
class FundedKey:
    plaintext: str
    key: ApiKey
    account: Account


async def make_key(store: LedgerStore, *, balance_micro: int = 10_000_000, **limits: Any) -> FundedKey:
    byok = limits.pop("byok", False)
    expires_at = limits.pop("expires_at", None)
    account = await open_account(store, "acme", balance_micro)
    issued = await issue_key(
        store,
        account_id=account.id,
        name="test",
        limits=KeyLimits(**limits),
        byok=byok,
        expires_at=expires_at,
    )
    return FundedKey(issued.plaintext.get_secret_value(), issued.key, account)


def chat_model(model_id: str = "acme/chat", **pricing: Any) -> ModelConfig:
    prices = {"prompt_per_mtok": Decimal("1.00"), "completion_per_mtok": Decimal("2.00"), **pricing}
    return ModelConfig(
        id=model_id,
        engine=EngineKind.mock,
        source=f"local/{model_id}",
        pricing=Pricing(**prices),
        engine_args={"max_model_len": 1000},
    )


def fake_replica(replica_id: str = "acme-chat-0", gpu_ids: tuple[int, ...] = (0, 1)) -> Any:
    return SimpleNamespace(replica_id=replica_id, spec=SimpleNamespace(gpu_ids=gpu_ids))


def provenance_for(replica: Any) -> Provenance:
    if replica is None:
        return Provenance(worker_id="worker-1", engine_version="vllm 0.32.0")
    return Provenance(
        worker_id="worker-1",
        replica_id=replica.replica_id,
        gpu_model="NVIDIA H100 80GB HBM3",
        gpu_uuids=tuple(f"GPU-{i}" for i in replica.spec.gpu_ids),
        model_revision="abc123",
        engine_version="vllm 0.32.0",
    )


def disclosure() -> DisclosureHook:
    """The hook the node installs ahead of billing: provenance headers and `usage.cost`."""
    return DisclosureHook(ProvenanceCache(provenance_for))


def make_context(
    model: ModelConfig | None = None,
    *,
    request_id: str | None = None,
    max_tokens: int | None = 100,
    content: str = "hello",
    endpoint: str = "chat.completions",
) -> RequestContext:
    body: dict[str, Any] = {
        "model": (model or chat_model()).id,
        "messages": [{"role": "user", "content": content}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return RequestContext(
        request_id=request_id or f"req-{uuid.uuid4().hex}",
        endpoint=endpoint,
        model=model or chat_model(),
        body=body,
        stream=False,
        client_wants_usage=False,
        headers={},
    )


def make_request(headers: dict[str, str] | None = None) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": raw,
            "query_string": b"",
        }
    )


def bearer(plaintext: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {plaintext}"}


def ledger_entry(
    record_id: str,
    *,
    request_id: str | None = None,
    key: ApiKey | None = None,
    cost: int = 0,
    worker_id: str = "worker-1",
    model: str = "acme/chat",
    received_at: datetime | None = None,
    gpu_seconds: float = 0.5,
) -> LedgerEntry:
    return LedgerEntry(
        record_id=record_id,
        request_id=request_id or f"client-{record_id}",
        worker_id=worker_id,
        key_id=key.id if key else None,
        account_id=key.account_id if key else None,
        model=model,
        endpoint="chat.completions",
        replica_id="acme-chat-0",
        gpu_uuids=("GPU-a", "GPU-b"),
        prompt_tokens=10,
        completion_tokens=5,
        cached_tokens=2,
        usage_estimated=False,
        cost_micro=cost,
        status_code=200,
        outcome="ok",
        finish_reason="stop",
        stream=True,
        received_at=to_epoch(received_at or datetime.now(UTC)),
        ttft_ms=12.5,
        duration_ms=40.0,
        gpu_seconds=gpu_seconds,
    )


POSTGRES_URL_ENV = "WORKER_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.fail(
            f'{POSTGRES_URL_ENV} is not set: run `eval "$(bash tests/services/postgres.sh)"` first '
            "(or deselect these tests with -m 'not postgres')"
        )
    return url


@contextlib.asynccontextmanager
async def fresh_database(kind: str, tmp_path: Any) -> AsyncIterator[str]:
    """The URL of an empty billing database of `kind` ("sqlite" or "postgres"), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = postgres_url()
    schema = f"billing_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(base)
    try:
        await connection.execute(f"CREATE SCHEMA {schema}")
    finally:
        await connection.close()
    # asyncpg passes unknown URL parameters to the server as settings.
    yield f"{base}{'&' if '?' in base else '?'}search_path={schema}"
    connection = await asyncpg.connect(base)
    try:
        await connection.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def store_at_schema_version(
    db_url: str, version: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LedgerStore]:
    """The store as a worker that knew only the schema's first `version` steps opened it (closed afterwards)."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:version])
    monkeypatch.setattr(schema, "LATEST_VERSION", version)
    old = await open_store(db_url)
    try:
        yield old
    finally:
        await old.close()
        monkeypatch.undo()


async def insert_raw_row(db_url: str, table: str, columns: Sequence[str], row: Sequence[Any]) -> None:
    """One row written straight into `table`, past the store: what an older worker's schema held."""
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({{}})"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            connection.execute(insert.format(", ".join("?" * len(row))), row)
        return
    connection = await asyncpg.connect(db_url)
    try:
        await connection.execute(insert.format(", ".join(f"${i}" for i in range(1, len(row) + 1))), *row)
    finally:
        await connection.close()
