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
from collections.abc import Sequence
from typing import Any

import asyncpg

from worker.billing.store.base import BalanceLimitExceeded, DuplicateRecordId, LedgerStore, Row, UnknownAccount
from worker.billing.store.group_commit import GroupCommit
from worker.billing.store.records import (
    MAX_BALANCE_MICRO,
    Account,
    AdminAction,
    ApiKey,
    LedgerEntry,
    ReplicaUptime,
    Reservation,
    ReserveOutcome,
    WorkerClaim,
    utc_month,
)
from worker.billing.store.schema import SCHEMA_VERSION_TABLE, pending_migrations
from worker.billing.store.sql import (
    account_from_row,
    admin_audit_params,
    claim_from_row,
    claim_params,
    in_dialect,
    key_from_row,
    ledger_params,
    new_key_params,
)

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every worker migrating the same database.
_MIGRATION_LOCK_ID = 0x10_7E_B1_11
_SQL = in_dialect("${}")
# Conditional updates that must say whether they matched: asyncpg's fetchval returns None when none did.
_SQL.KEY_RESERVE += " RETURNING id"
_SQL.ACCOUNT_RESERVE += " RETURNING id"


class _Refused(Exception):
    def __init__(self, outcome: ReserveOutcome) -> None:
        self.outcome = outcome


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

    # Accounts and keys.
    async def create_account(self, account_id: str, name: str, balance_micro: int, created_at: float) -> Account:
        row = await self._pool.fetchrow(_SQL.ACCOUNT_INSERT, account_id, name, balance_micro, created_at)
        return account_from_row(row)

    async def top_up(self, account_id: str, amount_micro: int) -> Account:
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(_SQL.TOP_UP, amount_micro, account_id, MAX_BALANCE_MICRO)
            if row is None:
                if await connection.fetchval(_SQL.ACCOUNT_EXISTS, account_id) is None:
                    raise UnknownAccount(account_id)
                raise BalanceLimitExceeded(account_id)
        return account_from_row(row)

    async def create_key(self, key: ApiKey) -> ApiKey:
        try:
            return key_from_row(await self._pool.fetchrow(_SQL.KEY_INSERT, *new_key_params(key)))
        except asyncpg.ForeignKeyViolationError:
            raise UnknownAccount(key.account_id) from None

    async def revoke_key(self, key_id: str, revoked_at: float) -> ApiKey | None:
        row = await self._pool.fetchrow(_SQL.KEY_REVOKE, revoked_at, key_id)
        return key_from_row(row) if row else None

    # Money on the request path.
    async def reserve(self, reservation: Reservation) -> ReserveOutcome:
        r = reservation
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute("SET LOCAL synchronous_commit TO OFF")
                if await connection.fetchval(_SQL.KEY_RESERVE, r.amount_micro, r.key_id, r.month) is None:
                    state = await connection.fetchrow(_SQL.KEY_STATE, r.key_id)
                    gone = state is None or state[0] is not None
                    raise _Refused(ReserveOutcome.key_revoked if gone else ReserveOutcome.spend_cap_reached)
                if await connection.fetchval(_SQL.ACCOUNT_RESERVE, r.amount_micro, r.account_id) is None:
                    raise _Refused(ReserveOutcome.insufficient_balance)
                await connection.execute(
                    _SQL.RESERVATION_INSERT, r.record_id, r.account_id, r.key_id, r.amount_micro, r.holder, r.created_at
                )
        except _Refused as refused:
            return refused.outcome
        return ReserveOutcome.reserved

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

    async def release_reservation(self, record_id: str) -> bool:
        return await self._release(_SQL.RESERVATION_DROP, record_id) > 0

    async def release_reservations(self, holder: str, older_than: float) -> int:
        return await self._release(_SQL.RESERVATIONS_DROP_GONE, holder, older_than)

    async def _release(self, drop: str, *params: Any) -> int:
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(drop, *params)
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

    # The admin audit trail.
    async def append_admin_audit(self, action: AdminAction) -> int:
        return int(await self._pool.fetchval(_SQL.ADMIN_AUDIT_APPEND, *admin_audit_params(action)))

    # One running worker per worker id, and the outbox.
    async def claim_worker_id(
        self, claim: WorkerClaim, stale_before: float, gone_instance: str | None = None
    ) -> WorkerClaim | None:
        async with self._pool.acquire() as connection, connection.transaction():
            status = await connection.execute(
                _SQL.WORKER_CLAIM, *claim_params(claim), stale_before, gone_instance or ""
            )
            if status == "INSERT 0 1":
                return None
            return claim_from_row(await connection.fetchrow(_SQL.WORKER_CLAIM_HOLDER, claim.worker_id))

    async def renew_worker_claim(self, worker_id: str, instance_id: str, now: float) -> bool:
        status = await self._pool.execute(_SQL.WORKER_CLAIM_RENEW, worker_id, instance_id, now)
        return bool(status == "UPDATE 1")

    async def release_worker_claim(self, worker_id: str, instance_id: str) -> None:
        await self._pool.execute(_SQL.WORKER_CLAIM_RELEASE, worker_id, instance_id)

    async def advance_outbox(self, worker_id: str, seq: int, now: float) -> None:
        await self._pool.execute(_SQL.ADVANCE_OUTBOX, worker_id, seq, now)

    async def save_replica_uptime(self, runs: Sequence[ReplicaUptime]) -> None:
        await self._pool.executemany(_SQL.REPLICA_UPTIME_SAVE, runs)


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
