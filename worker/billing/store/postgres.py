"""The billing store on PostgreSQL (asyncpg), for several workers sharing one ledger and one set of balances.

Reservations are single conditional UPDATEs, so workers racing for one account can never overdraw it.
They commit without waiting for the WAL flush: a reservation lost to a server crash is harmless, since
the restarted worker releases whatever it held anyway. Ledger records commit in batches with the
server's durable default. Every transaction locks key rows before account rows, each set in id order,
so concurrent reservations and settlements cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from worker.billing.store.base import DuplicateRecordId, LedgerStore, Row, WriteOp
from worker.billing.store.commands import COMMANDS, migrate
from worker.billing.store.group_commit import GroupCommit
from worker.billing.store.records import LedgerEntry
from worker.billing.store.sql import in_dialect, ledger_params

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every worker migrating the same database.
_MIGRATION_LOCK_ID = 0x10_7E_B1_11


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
                await migrate(PostgresStatements(connection), "postgres")
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
            if op == "reserve":  # a reservation lost to a server crash is harmless (see above)
                await connection.execute("SET LOCAL synchronous_commit TO OFF")
            return await COMMANDS[op](PostgresStatements(connection), *args)

    async def settle(self, record: LedgerEntry) -> int:
        seq = await self._settlements.submit(record)
        if seq is None:
            raise DuplicateRecordId(record.record_id)
        return seq

    async def _commit(self, records: list[LedgerEntry]) -> Sequence[int | BaseException | None]:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                seqs: list[int | None] = await COMMANDS["settle"](
                    PostgresStatements(connection), *(ledger_params(record) for record in records)
                )
                return seqs
        except Exception as error:  # noqa: BLE001  retried one by one; the failing record's caller hears why
            if len(records) > 1:  # one bad record must not fail its neighbours: retry each on its own
                return [outcome for record in records for outcome in await self._commit([record])]
            logger.error("ledger write failed", extra={
                "record_id": records[0].record_id, "request_id": records[0].request_id, "error": repr(error)})
            return [error]


class PostgresStatements:
    """The commands' statements on one connection (worker/billing/store/commands.py)."""

    sql = in_dialect("${}")

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    async def rows(self, sql: str, *params: Any) -> list[Row]:
        rows: list[Row] = await self.connection.fetch(sql, *params)
        return rows

    async def count(self, sql: str, *params: Any) -> int:
        status: str = await self.connection.execute(sql, *params)  # e.g. "UPDATE 1", "INSERT 0 1", "CREATE TABLE"
        changed = status.rsplit(" ", 1)[-1]
        return int(changed) if changed.isdigit() else 0
