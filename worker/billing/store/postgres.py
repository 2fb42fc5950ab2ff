"""The billing store on PostgreSQL (asyncpg), for several workers sharing one ledger and one set of balances.

Reservations are single conditional UPDATEs, so workers racing for one account can never overdraw it.
They commit without waiting for the WAL flush: a reservation lost to a server crash is harmless, since
the restarted worker releases whatever it held anyway. Ledger records commit in batches with the
server's durable default. Every transaction locks key rows before account rows, each set in id order,
so concurrent reservations and settlements cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import asyncpg

from worker.billing.store.base import (
    BalanceLimitExceeded,
    DuplicateRecordId,
    LedgerStore,
    Refused,
    Row,
    UnknownAccount,
    WriteOp,
)
from worker.billing.store.group_commit import GroupCommit
from worker.billing.store.records import (
    MAX_BALANCE_MICRO,
    LedgerEntry,
    ReserveOutcome,
    utc_month,
)
from worker.billing.store.schema import SCHEMA_VERSION_TABLE, pending_migrations
from worker.billing.store.sql import (
    in_dialect,
    ledger_params,
)

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every worker migrating the same database.
_MIGRATION_LOCK_ID = 0x10_7E_B1_11
_SQL = in_dialect("${}")
# Conditional updates that must say whether they matched: asyncpg's fetchval returns None when none did.
_SQL.KEY_RESERVE += " RETURNING id"
_SQL.ACCOUNT_RESERVE += " RETURNING id"


class PostgresStore(LedgerStore):
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._settlements: GroupCommit[LedgerEntry, int | None] = GroupCommit(self._commit)
        self._closed = False

    @classmethod
    async def open(cls, dsn: str) -> PostgresStore:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
        try:
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
                await connection.execute(SCHEMA_VERSION_TABLE)
                applied = await connection.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                for migration in pending_migrations(applied):
                    for statement in migration.postgres:
                        await connection.execute(statement)
                    await connection.execute(
                        "INSERT INTO schema_version VALUES ($1, $2, $3)",
                        migration.version,
                        migration.description,
                        time.time(),
                    )
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._settlements.close()
        await self._pool.close()

    @property
    def pending_writes(self) -> int:
        return self._settlements.pending

    async def _fetch(self, sql: str, params: list[Any], *, settled: bool) -> list[Row]:
        rows: list[Row] = await self._pool.fetch(sql, *params)
        return rows

    def _parameter(self, number: int) -> str:
        return f"${number}"

    async def _write(self, op: WriteOp, *args: Any) -> Any:
        async with self._pool.acquire() as connection, connection.transaction():
            return await _WRITES[op](connection, *args)

    async def settle(self, record: LedgerEntry) -> int:
        seq = await self._settlements.submit(record)
        if seq is None:
            raise DuplicateRecordId(record.record_id)
        return seq

    async def _commit(self, records: list[LedgerEntry]) -> Sequence[int | BaseException | None]:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                return await _settle_all(connection, records)
        except Exception as error:  # noqa: BLE001  retried one by one; the failing record's caller hears why
            if len(records) > 1:  # one bad record must not fail its neighbours: retry each on its own
                return [outcome for record in records for outcome in await self._commit([record])]
            logger.error("ledger write failed", extra={
                "record_id": records[0].record_id, "request_id": records[0].request_id, "error": repr(error)})
            return [error]


# The writes, by command: each runs in a transaction of its own.
async def _top_up(connection: asyncpg.Connection, account_id: str, amount_micro: int) -> Row:
    row: Row | None = await connection.fetchrow(_SQL.TOP_UP, amount_micro, account_id, MAX_BALANCE_MICRO)
    if row is None:
        exists = await connection.fetchval(_SQL.ACCOUNT_EXISTS, account_id)
        raise (UnknownAccount if exists is None else BalanceLimitExceeded)(account_id)
    return row


async def _create_key(connection: asyncpg.Connection, *params: Any) -> Row:
    try:
        row: Row = await connection.fetchrow(_SQL.KEY_INSERT, *params)
    except asyncpg.ForeignKeyViolationError:
        raise UnknownAccount(params[1]) from None
    return row


async def _reserve(connection: asyncpg.Connection, record_id: str, account_id: str, key_id: str, amount: int,
                   holder: str, created_at: float, month: str) -> None:
    await connection.execute("SET LOCAL synchronous_commit TO OFF")
    if await connection.fetchval(_SQL.KEY_RESERVE, amount, key_id, month) is None:
        state = await connection.fetchrow(_SQL.KEY_STATE, key_id)
        gone = state is None or state[0] is not None
        raise Refused((ReserveOutcome.key_revoked if gone else ReserveOutcome.spend_cap_reached).value)
    if await connection.fetchval(_SQL.ACCOUNT_RESERVE, amount, account_id) is None:
        raise Refused(ReserveOutcome.insufficient_balance.value)
    await connection.execute(_SQL.RESERVATION_INSERT, record_id, account_id, key_id, amount, holder, created_at)


async def _release(connection: asyncpg.Connection, record_id: str | None, holder: str | None,
                   older_than: float | None) -> int:
    """Drop one reservation (`record_id`), or `holder`'s and those made before `older_than`."""
    if record_id is not None:
        rows = await connection.fetch(_SQL.RESERVATION_DROP, record_id)
    else:
        rows = await connection.fetch(_SQL.RESERVATIONS_DROP_GONE, holder, older_than)
    keys: dict[str, int] = {}
    accounts: dict[str, int] = {}
    for row in rows:
        keys[row["key_id"]] = keys.get(row["key_id"], 0) + row["amount_micro"]
        accounts[row["account_id"]] = accounts.get(row["account_id"], 0) + row["amount_micro"]
    # Keys before accounts, each in id order: the same lock order as every other transaction.
    await connection.executemany(_SQL.KEY_UNRESERVE, [(amount, key) for key, amount in sorted(keys.items())])
    await connection.executemany(
        _SQL.ACCOUNT_UNRESERVE, [(amount, account) for account, amount in sorted(accounts.items())]
    )
    return len(rows)


async def _claim_worker(connection: asyncpg.Connection, *params: Any) -> Row | None:
    """None when taken; else the holder's claim, unchanged."""
    if await connection.execute(_SQL.WORKER_CLAIM, *params) == "INSERT 0 1":
        return None
    row: Row | None = await connection.fetchrow(_SQL.WORKER_CLAIM_HOLDER, params[0])
    return row


async def _one_row(sql: str, connection: asyncpg.Connection, *params: Any) -> Row | None:
    row: Row | None = await connection.fetchrow(sql, *params)
    return row


async def _value(sql: str, connection: asyncpg.Connection, *params: Any) -> Any:
    return await connection.fetchval(sql, *params)


async def _changed_one(sql: str, connection: asyncpg.Connection, *params: Any) -> bool:
    return bool((await connection.execute(sql, *params)).endswith(" 1"))


_WRITES: dict[str, Callable[..., Awaitable[Any]]] = {
    "create_account": partial(_one_row, _SQL.ACCOUNT_INSERT), "top_up": _top_up, "create_key": _create_key,
    "revoke_key": partial(_one_row, _SQL.KEY_REVOKE), "reserve": _reserve, "release": _release,
    "append_audit": partial(_value, _SQL.ADMIN_AUDIT_APPEND), "claim_worker": _claim_worker,
    "renew_claim": partial(_changed_one, _SQL.WORKER_CLAIM_RENEW),
    "release_claim": partial(_changed_one, _SQL.WORKER_CLAIM_RELEASE),
    "advance_outbox": partial(_changed_one, _SQL.ADVANCE_OUTBOX),
    "save_uptime": partial(_changed_one, _SQL.REPLICA_UPTIME_SAVE),
}


async def _settle_all(connection: asyncpg.Connection, records: list[LedgerEntry]) -> list[int | None]:
    seqs: list[int | None] = []
    for record in records:
        seqs.append(await connection.fetchval(_SQL.LEDGER_INSERT, *ledger_params(record)))
    fresh = [record for record, seq in zip(records, seqs, strict=True) if seq is not None]
    held = {
        row["record_id"]: row["amount_micro"]
        for row in await connection.fetch(
            "DELETE FROM reservations WHERE record_id = ANY($1::text[]) RETURNING record_id, amount_micro",
            [record.record_id for record in fresh],
        )
    }
    key_updates: list[tuple[int, str, int, str]] = []
    account_updates: list[tuple[int, int, str]] = []
    for record in fresh:
        released = held.get(record.record_id, 0)
        if record.key_id is not None:
            key_updates.append(
                (released, utc_month(record.received_at), record.cost_micro, record.key_id)
            )
        if record.account_id is not None:
            account_updates.append((record.cost_micro, released, record.account_id))
    # Keys before accounts, each in id order: the same lock order as every other transaction.
    await connection.executemany(_SQL.KEY_CHARGE, sorted(key_updates, key=lambda u: (u[3], u[1])))
    await connection.executemany(_SQL.ACCOUNT_CHARGE, sorted(account_updates, key=lambda u: u[2]))
    return seqs
