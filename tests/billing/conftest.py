"""Billing fixtures: an empty store on SQLite and on PostgreSQL, and a billing service on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.billing.support import provenance_for
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore, open_store

POSTGRES_URL_ENV = "WORKER_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.fail(
            f'{POSTGRES_URL_ENV} is not set: run `eval "$(bash tests/services/postgres.sh)"` first '
            "(or deselect these tests with -m 'not postgres')"
        )
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


@pytest.fixture
def service(store: LedgerStore) -> BillingService:
    return BillingService(store=store, worker_id="worker-1", auth_required=True, provenance=provenance_for)
