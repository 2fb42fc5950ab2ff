"""Billing fixtures: an empty store on SQLite and on PostgreSQL, and a billing service on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.billing.support import fresh_database, provenance_for
from worker.billing.service import BillingService
from worker.billing.store import LedgerStore, open_store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """A fresh, empty billing database: a SQLite file, or a PostgreSQL schema of its own."""
    async with fresh_database(request.param, tmp_path) as url:
        yield url


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
