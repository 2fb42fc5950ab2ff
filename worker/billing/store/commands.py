"""The store's write commands, written once for both databases.

Each runs inside a transaction its store opened (SQLite: a savepoint of the database process's batch;
PostgreSQL: a transaction of its own, or the group commit's for settlements) and reaches the database only
through `Statements`: asyncpg's connection on PostgreSQL, sqlite3's (whose calls never suspend) in SQLite's
database process. Every transaction locks key rows before account rows, each set in id order, so concurrent
ones on PostgreSQL cannot deadlock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any, Literal, Protocol, TypeVar

from worker.billing.store.base import BalanceLimitExceeded, Refused, Row, UnknownAccount
from worker.billing.store.records import MAX_BALANCE_MICRO, ReserveOutcome, utc_month
from worker.billing.store.schema import SCHEMA_VERSION_TABLE, pending_migrations
from worker.billing.store.sql import LEDGER_INSERT_COLUMNS

Result = TypeVar("Result")


class Statements(Protocol):
    sql: SimpleNamespace  # worker.billing.store.sql's statements in this database's dialect

    async def rows(self, sql: str, *params: Any) -> Sequence[Row]: ...

    async def count(self, sql: str, *params: Any) -> int:
        """How many rows the statement changed (0 for one that changes no rows, such as DDL)."""


async def _first(db: Statements, sql: str, *params: Any) -> Row | None:
    rows = await db.rows(sql, *params)
    return rows[0] if rows else None


async def _top_up(db: Statements, account_id: str, amount_micro: int) -> Row:
    row = await _first(db, db.sql.TOP_UP, amount_micro, account_id, MAX_BALANCE_MICRO)
    if row is None:
        exists = await db.rows(db.sql.ACCOUNT_EXISTS, account_id)
        raise (BalanceLimitExceeded if exists else UnknownAccount)(account_id)
    return row


async def _create_key(db: Statements, *params: Any) -> Row | None:
    if not await db.rows(db.sql.ACCOUNT_EXISTS, params[1]):
        raise UnknownAccount(params[1])
    return await _first(db, db.sql.KEY_INSERT, *params)


async def _reserve(db: Statements, record_id: str, account_id: str, key_id: str, amount: int, holder: str,
                   created_at: float, month: str) -> str:
    if not await db.count(db.sql.KEY_RESERVE, amount, key_id, month):
        state = await _first(db, db.sql.KEY_STATE, key_id)
        gone = state is None or state["revoked_at"] is not None
        raise Refused((ReserveOutcome.key_revoked if gone else ReserveOutcome.spend_cap_reached).value)
    if not await db.count(db.sql.ACCOUNT_RESERVE, amount, account_id):
        raise Refused(ReserveOutcome.insufficient_balance.value)
    await db.count(db.sql.RESERVATION_INSERT, record_id, account_id, key_id, amount, holder, created_at)
    return ReserveOutcome.reserved.value


_RECORD_ID, _KEY_ID, _ACCOUNT_ID, _COST, _RECEIVED_AT = (
    LEDGER_INSERT_COLUMNS.index(column)
    for column in ("record_id", "key_id", "account_id", "cost_micro", "received_at")
)


async def _settle(db: Statements, *rows: Sequence[Any]) -> list[int | None]:
    """Append ledger rows, and for each release its reservation and charge its cost; each row's seq, or None
    (and nothing charged) for a record id the ledger holds already."""
    seqs: list[int | None] = []
    keys: list[tuple[str, str, int, int]] = []
    accounts: list[tuple[str, int, int]] = []
    for row in rows:
        inserted = await _first(db, db.sql.LEDGER_INSERT, *row)
        seqs.append(int(inserted["seq"]) if inserted is not None else None)
        if inserted is None or (row[_KEY_ID] is None and row[_ACCOUNT_ID] is None):
            continue
        held = await _first(db, db.sql.RESERVATION_DROP, row[_RECORD_ID])
        released = held["amount_micro"] if held is not None else 0
        if row[_KEY_ID] is not None:
            keys.append((row[_KEY_ID], utc_month(row[_RECEIVED_AT]), released, row[_COST]))
        if row[_ACCOUNT_ID] is not None:
            accounts.append((row[_ACCOUNT_ID], released, row[_COST]))
    for key_id, month, released, cost in sorted(keys):
        await db.count(db.sql.KEY_CHARGE, released, month, cost, key_id)
    for account_id, released, cost in sorted(accounts):
        await db.count(db.sql.ACCOUNT_CHARGE, cost, released, account_id)
    return seqs


async def _release(db: Statements, record_id: str | None, holder: str | None, older_than: float | None) -> int:
    """Drop one reservation (`record_id`), or `holder`'s and those made before `older_than`."""
    if record_id is not None:
        rows = await db.rows(db.sql.RESERVATION_DROP, record_id)
    else:
        rows = await db.rows(db.sql.RESERVATIONS_DROP_GONE, holder, older_than)
    keys: Counter[str] = Counter()
    accounts: Counter[str] = Counter()
    for row in rows:
        keys[row["key_id"]] += row["amount_micro"]
        accounts[row["account_id"]] += row["amount_micro"]
    for key_id, amount in sorted(keys.items()):
        await db.count(db.sql.KEY_UNRESERVE, amount, key_id)
    for account_id, amount in sorted(accounts.items()):
        await db.count(db.sql.ACCOUNT_UNRESERVE, amount, account_id)
    return len(rows)


async def _claim_worker(db: Statements, *params: Any) -> Row | None:
    """None when taken; else the holder's claim, unchanged."""
    if await db.count(db.sql.WORKER_CLAIM, *params) == 1:
        return None
    return await _first(db, db.sql.WORKER_CLAIM_HOLDER, params[0])


async def _append_audit(db: Statements, *params: Any) -> int:
    row = await _first(db, db.sql.ADMIN_AUDIT_APPEND, *params)
    assert row is not None  # an INSERT ... RETURNING
    return int(row["seq"])


async def _one_row(statement: str, db: Statements, *params: Any) -> Row | None:
    return await _first(db, getattr(db.sql, statement), *params)


async def _changed_one(statement: str, db: Statements, *params: Any) -> bool:
    return await db.count(getattr(db.sql, statement), *params) == 1


# By `WriteOp`.
COMMANDS: dict[str, Callable[..., Coroutine[Any, Any, Any]]] = {
    "create_account": partial(_one_row, "ACCOUNT_INSERT"), "top_up": _top_up, "create_key": _create_key,
    "revoke_key": partial(_one_row, "KEY_REVOKE"), "reserve": _reserve, "settle": _settle, "release": _release,
    "append_audit": _append_audit, "claim_worker": _claim_worker,
    "renew_claim": partial(_changed_one, "WORKER_CLAIM_RENEW"),
    "release_claim": partial(_changed_one, "WORKER_CLAIM_RELEASE"),
    "advance_outbox": partial(_changed_one, "ADVANCE_OUTBOX"),
    "save_uptime": partial(_changed_one, "REPLICA_UPTIME_SAVE"),
}


async def migrate(db: Statements, dialect: Literal["sqlite", "postgres"]) -> None:
    """Apply the schema's missing steps, in the caller's transaction (one that no other migration runs beside)."""
    await db.count(SCHEMA_VERSION_TABLE)
    (applied,) = await db.rows("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version")
    for migration in pending_migrations(applied["version"]):
        for statement in getattr(migration, dialect):
            await db.count(statement)
        await db.count(db.sql.SCHEMA_VERSION_INSERT, migration.version, migration.description, time.time())


def run_now(command: Coroutine[Any, Any, Result]) -> Result:
    """Run a command whose statements never suspend (sqlite3's) to its end, without an event loop."""
    try:
        command.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    command.close()
    raise RuntimeError("a store command waited on something other than its database")
