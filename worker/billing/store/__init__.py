"""Where accounts, keys, reservations and the ledger live: SQLite (one node) or PostgreSQL (shared)."""

from __future__ import annotations

from typing import Literal

from worker.billing.store.base import BalanceLimitExceeded, DuplicateRecordId, LedgerStore, UnknownAccount
from worker.billing.store.schema import LATEST_VERSION, SchemaTooNew

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


async def open_store(db_url: str, *, sqlite_synchronous: Literal["full", "normal"] = "normal") -> LedgerStore:
    """Open (and migrate) the store a `WORKER_DB_URL` names.

    `sqlite:///relative/path.db` and `sqlite:////absolute/path.db` (as SQLAlchemy spells them), or
    `postgresql://user:password@host:port/database`.
    """
    if db_url.startswith(_SQLITE_PREFIX):
        path = db_url[len(_SQLITE_PREFIX) :]
        if not path or path == ":memory:":
            raise ValueError("the billing database must be a file: sqlite:///path/to/ledger.db")
        from worker.billing.store.sqlite import SqliteStore

        return await SqliteStore.open(path, synchronous=sqlite_synchronous)
    if db_url.startswith(_POSTGRES_PREFIXES):
        from worker.billing.store.postgres import PostgresStore

        return await PostgresStore.open(db_url)
    raise ValueError("WORKER_DB_URL must start with sqlite:/// or postgresql://")


__all__ = [
    "LATEST_VERSION",
    "BalanceLimitExceeded",
    "DuplicateRecordId",
    "LedgerStore",
    "SchemaTooNew",
    "UnknownAccount",
    "open_store",
]
