"""Billing fixtures: the store on SQLite and on PostgreSQL, funded accounts and keys, a billing service."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from starlette.requests import Request

from worker.billing.issuing import issue_key, open_account
from worker.billing.provenance import Provenance
from worker.billing.records import Account, ApiKey, KeyLimits
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore, open_store
from worker.config import ModelConfig, Pricing
from worker.gateway.context import RequestContext

POSTGRES_URL_ENV = "WORKER_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.fail(f'{POSTGRES_URL_ENV} is not set: run `eval "$(bash tests/services/postgres.sh)"` first '
                    "(or deselect these tests with -m 'not postgres')")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """A fresh, empty billing database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
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


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[LedgerStore]:
    opened = await open_store(db_url)
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class FundedKey:
    plaintext: str
    key: ApiKey
    account: Account


async def make_key(store: LedgerStore, *, balance_micro: int = 10_000_000, **limits: Any) -> FundedKey:
    byok = limits.pop("byok", False)
    expires_at = limits.pop("expires_at", None)
    account = await open_account(store, "acme", balance_micro)
    issued = await issue_key(store, account_id=account.id, name="test", limits=KeyLimits(**limits), byok=byok,
                             expires_at=expires_at)
    return FundedKey(issued.plaintext.get_secret_value(), issued.key, account)


def chat_model(model_id: str = "acme/chat", **pricing: Any) -> ModelConfig:
    prices = {"prompt_per_mtok": Decimal("1.00"), "completion_per_mtok": Decimal("2.00"), **pricing}
    return ModelConfig(id=model_id, engine="mock", source=f"local/{model_id}", pricing=Pricing(**prices),
                       engine_args={"max_model_len": 1000})


def fake_replica(replica_id: str = "acme-chat-0", gpu_ids: tuple[int, ...] = (0, 1)) -> Any:
    return SimpleNamespace(replica_id=replica_id, spec=SimpleNamespace(gpu_ids=gpu_ids))


def provenance_for(replica: Any) -> Provenance:
    if replica is None:
        return Provenance(worker_id="worker-1", engine_version="vllm 0.32.0")
    return Provenance(worker_id="worker-1", replica_id=replica.replica_id, gpu_model="NVIDIA H100 80GB HBM3",
                      gpu_uuids=tuple(f"GPU-{i}" for i in replica.spec.gpu_ids), model_revision="abc123",
                      engine_version="vllm 0.32.0")


def make_context(model: ModelConfig | None = None, *, request_id: str | None = None, max_tokens: int | None = 100,
                 content: str = "hello", endpoint: str = "chat.completions") -> RequestContext:
    body: dict[str, Any] = {"model": (model or chat_model()).id, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return RequestContext(request_id=request_id or f"req-{uuid.uuid4().hex}", endpoint=endpoint,
                          model=model or chat_model(), body=body, stream=False, client_wants_usage=False,
                          headers={})


def make_request(headers: dict[str, str] | None = None) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw,
                    "query_string": b""})


def bearer(plaintext: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {plaintext}"}


@pytest.fixture
def service(store: LedgerStore) -> BillingService:
    return BillingService(store=store, worker_id="worker-1", auth_required=True, provenance=provenance_for)
