"""The one interface the billing service, the admin API, the outbox and the CLI use to reach the database.

SQLite and PostgreSQL implement all of it; callers never ask which one they have. It is written once, here:
each store only says how it runs a query (`_fetch`), writes a parameter (`_parameter`), runs one write command
(`_write`) and settles a record (`settle`).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from worker.billing.store.records import (
    Account,
    AdminAction,
    AdminAuditRecord,
    ApiKey,
    LedgerEntry,
    LedgerFilter,
    LedgerRecord,
    ReplicaUptime,
    Reservation,
    ReserveOutcome,
    WorkerClaim,
)
from worker.billing.store.sql import (
    ACCOUNT_COLUMNS,
    ADMIN_AUDIT_COLUMNS,
    KEY_COLUMNS,
    LEDGER_COLUMNS,
    account_from_row,
    admin_audit_from_row,
    admin_audit_params,
    claim_from_row,
    claim_params,
    key_from_row,
    ledger_conditions,
    ledger_from_row,
    new_key_params,
)

Row = Mapping[str, Any]
# The write commands a store runs, each in a transaction of its own (or a savepoint of a batch's); "settle" is
# SQLite's own (PostgreSQL settles through its group commit).
WriteOp = Literal[
    "create_account", "top_up", "create_key", "revoke_key", "reserve", "settle", "release", "append_audit",
    "claim_worker", "renew_claim", "release_claim", "advance_outbox", "save_uptime",
]


class UnknownAccount(LookupError):
    pass


class BalanceLimitExceeded(ValueError):
    """A top-up would take the balance past MAX_BALANCE_MICRO; nothing was changed."""


class DuplicateRecordId(ValueError):
    """A ledger record with this record id exists already; the new one was not written or charged."""


class Refused(Exception):
    """A reservation refused for `ReserveOutcome(args[0])`; nothing it wrote stays."""


class LedgerStore(abc.ABC):
    dialect: str

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued writes, then release connections."""

    @abc.abstractmethod
    async def _fetch(self, sql: str, params: list[Any], *, settled: bool) -> Sequence[Row]:
        """The rows of a read-only query. `settled`: it reads what settling records changes (balances, the
        ledger), so it must see every record settled before the call."""

    @abc.abstractmethod
    def _parameter(self, number: int) -> str:
        """How the dialect writes the query's `number`th (from 1) parameter."""

    @abc.abstractmethod
    async def _write(self, op: WriteOp, *args: Any) -> Any:
        """Run one write command: its row (a column map) or None, its count or flag; raises as the store's
        methods document, and Refused for a refused reservation."""

    async def _rows(self, template: str, *params: Any, settled: bool = True) -> Sequence[Row]:
        """`template`'s `{}`s are its parameters, in order."""
        sql = template.format(*(self._parameter(number) for number in range(1, len(params) + 1)))
        return await self._fetch(sql, list(params), settled=settled)

    # Accounts and keys.
    async def create_account(self, account_id: str, name: str, balance_micro: int, created_at: float) -> Account:
        return account_from_row(await self._write("create_account", account_id, name, balance_micro, created_at))

    async def get_account(self, account_id: str) -> Account | None:
        rows = await self._rows(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = {{}}", account_id)
        return account_from_row(rows[0]) if rows else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._rows(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id")
        return [account_from_row(row) for row in rows]

    async def top_up(self, account_id: str, amount_micro: int) -> Account:
        """Add to (or, negative, take from) the balance; raises UnknownAccount, and BalanceLimitExceeded
        when the balance would pass MAX_BALANCE_MICRO."""
        return account_from_row(await self._write("top_up", account_id, amount_micro))

    async def create_key(self, key: ApiKey) -> ApiKey:
        """Stores a new key (its fields from `revoked_at` on are not read); raises UnknownAccount."""
        return key_from_row(await self._write("create_key", *new_key_params(key)))

    async def find_key_by_hash(self, key_hash: str, *, settled: bool = False) -> ApiKey | None:
        """`settled`: wait for the records settled before the call, so that the key's spend this month counts
        them (the key holder's own view). Authenticating an inference request does not: its reservation
        re-checks the cap in its own transaction, so a key-cache miss never waits for a ledger batch."""
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = {{}}", key_hash, settled=settled)
        return key_from_row(rows[0]) if rows else None

    async def get_key(self, key_id: str) -> ApiKey | None:
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = {{}}", key_id)
        return key_from_row(rows[0]) if rows else None

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        where, params = ("", ()) if account_id is None else (" WHERE account_id = {}", (account_id,))
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys{where} ORDER BY created_at, id", *params)
        return [key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str, revoked_at: float) -> ApiKey | None:
        """Revoke (idempotent: the first revocation time stays); None when there is no such key."""
        row = await self._write("revoke_key", revoked_at, key_id)
        return key_from_row(row) if row is not None else None

    # Money on the request path.
    async def reserve(self, reservation: Reservation) -> ReserveOutcome:
        """Atomically hold `amount_micro` of the account's balance and of the key's monthly cap.

        Succeeds only while `balance - reserved >= amount` and, with a cap, `spent this month + reserved
        + amount <= cap`, so concurrent requests (on this worker or others sharing the database) can
        never spend more than there is. A key revoked since it was looked up is refused. Raises when
        the record id holds a reservation already (record ids are unique by construction).
        """
        r = reservation
        try:
            await self._write(
                "reserve", r.record_id, r.account_id, r.key_id, r.amount_micro, r.holder, r.created_at, r.month
            )
        except Refused as refused:
            return ReserveOutcome(refused.args[0])
        return ReserveOutcome.reserved

    @abc.abstractmethod
    async def settle(self, record: LedgerEntry) -> int:
        """Append the record and, in the same transaction, release its reservation and charge its cost.

        Group-committed: returns the record's seq once the transaction holding it is durable. Raises
        DuplicateRecordId (and charges nothing) when the record id is already in the ledger, so settling
        the same record twice never charges twice. Request ids may repeat freely.
        """

    async def settle_soon(self, record: LedgerEntry) -> asyncio.Future[int]:
        """Like `settle`, but return as soon as the record will survive the worker being killed.

        The returned future holds what `settle` would have returned or raised. A store that journals
        records (SQLite with synchronous=NORMAL, see `start_journal`) returns before the database
        commit; the others once it is done. Raises when the record could not be kept at all.
        """
        settled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            settled.set_result(await self.settle(record))
        except DuplicateRecordId as duplicate:
            settled.set_exception(duplicate)
        return settled

    async def flush(self) -> None:
        """Return once every record `settle_soon` took is settled in the database (or has failed)."""
        return None  # settle_soon settles before it returns, unless the store journals

    async def start_journal(self, worker_id: str) -> int:
        """Begin journaling `worker_id`'s records (where the store does), after settling what the
        journal holds from a previous run of that worker id. Returns how many records that added to the
        ledger. Call it only while holding the worker id's claim."""
        return 0

    async def release_reservation(self, record_id: str) -> bool:
        """Drop one request's reservation without charging (it never reached the engine)."""
        return bool(await self._write("release", record_id, None, None) > 0)

    async def release_reservations(self, holder: str, older_than: float) -> int:
        """Drop reservations of requests that can no longer finish: all of `holder`'s (a restarted
        worker), and anyone's made before `older_than`. Returns how many were dropped."""
        return int(await self._write("release", None, holder, older_than))

    # The ledger.
    async def query_ledger(
        self, where: LedgerFilter, *, limit: int, order: Literal["asc", "desc"] = "desc", cursor: int | None = None
    ) -> list[LedgerRecord]:
        """Records matching `where`, by seq; `cursor` excludes seq <= cursor (asc) or >= cursor (desc)."""
        conditions = ledger_conditions(where)
        if cursor is not None:
            conditions.append(("seq > {}" if order == "asc" else "seq < {}", cursor))
        clause, params = _where(conditions)
        query = f"SELECT {LEDGER_COLUMNS} FROM ledger{clause} ORDER BY seq {order.upper()} LIMIT {{}}"
        return [ledger_from_row(row) for row in await self._rows(query, *params, limit)]

    async def count_ledger(self, where: LedgerFilter, after_seq: int = 0) -> int:
        clause, params = _where([*ledger_conditions(where), ("seq > {}", after_seq)])
        (row,) = await self._rows(f"SELECT COUNT(*) AS n FROM ledger{clause}", *params)
        return int(row["n"])

    # Replica up-time, and reports over it and the ledger (worker.economics).
    async def save_replica_uptime(self, runs: Sequence[ReplicaUptime]) -> None:
        """Insert or update replica runs, each keyed by its worker, replica and start."""
        await asyncio.gather(*(self._write("save_uptime", *run) for run in runs))

    async def read_only(self, template: str, *params: Any) -> Sequence[Row]:
        """The rows of a read-only query both dialects run, seeing every record settled before the call;
        the template's `{}`s are its parameters, in order."""
        return await self._rows(template, *params)

    # The admin audit trail.
    async def append_admin_audit(self, action: AdminAction) -> int:
        """Append one admin change (committed when this returns); returns its seq."""
        return int(await self._write("append_audit", *admin_audit_params(action)))

    async def query_admin_audit(self, *, limit: int, cursor: int | None = None) -> list[AdminAuditRecord]:
        """The newest changes first; `cursor` excludes seq >= cursor (the previous page's last seq)."""
        rows = await self._rows(
            f"SELECT {ADMIN_AUDIT_COLUMNS} FROM admin_audit WHERE seq < {{}} ORDER BY seq DESC LIMIT {{}}",
            cursor if cursor is not None else 2**63 - 1, limit, settled=False,
        )
        return [admin_audit_from_row(row) for row in rows]

    # One running worker per worker id.
    async def claim_worker_id(
        self, claim: WorkerClaim, stale_before: float, gone_instance: str | None = None
    ) -> WorkerClaim | None:
        """Take `claim.worker_id` for `claim.instance_id`, unless another instance holds it, renewed its
        claim at or after `stale_before` and is not `gone_instance`: then that holder's claim is returned
        and nothing changes."""
        holder = await self._write("claim_worker", *claim_params(claim), stale_before, gone_instance or "")
        return claim_from_row(holder) if holder is not None else None

    async def renew_worker_claim(self, worker_id: str, instance_id: str, now: float) -> bool:
        """False when the instance no longer holds the id (another took it over meanwhile)."""
        return bool(await self._write("renew_claim", worker_id, instance_id, now))

    async def release_worker_claim(self, worker_id: str, instance_id: str) -> None:
        await self._write("release_claim", worker_id, instance_id)

    # The outbox.
    async def outbox_cursor(self, worker_id: str) -> int:
        """The seq of the last record delivered for this worker (0 when none)."""
        rows = await self._rows("SELECT last_seq FROM outbox_cursors WHERE worker_id = {}", worker_id, settled=False)
        return int(rows[0]["last_seq"]) if rows else 0

    async def advance_outbox(self, worker_id: str, seq: int, now: float) -> None:
        """Move the cursor forward to `seq` (never backwards)."""
        await self._write("advance_outbox", worker_id, seq, now)

    @property
    @abc.abstractmethod
    def pending_writes(self) -> int:
        """Ledger writes queued and not yet committed."""


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in conditions), [value for _, value in conditions]
