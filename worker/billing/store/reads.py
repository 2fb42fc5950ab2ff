"""The store's reads, written once for SQLite and PostgreSQL: each store only says how it runs a query."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from worker.billing.store.base import LedgerStore
from worker.billing.store.records import Account, AdminAuditRecord, ApiKey, LedgerFilter, LedgerRecord
from worker.billing.store.rows import (
    ACCOUNT_COLUMNS,
    ADMIN_AUDIT_COLUMNS,
    KEY_COLUMNS,
    LEDGER_COLUMNS,
    account_from_row,
    admin_audit_from_row,
    key_from_row,
    ledger_conditions,
    ledger_from_row,
)

Row = Mapping[str, Any]


class SqlReads(LedgerStore):
    @abc.abstractmethod
    async def _fetch(self, sql: str, params: list[Any], *, settled: bool) -> Sequence[Row]:
        """The rows of a read-only query. `settled`: it reads what settling records changes (balances, the
        ledger), so it must see every record settled before the call."""

    @abc.abstractmethod
    def _parameter(self, number: int) -> str:
        """How the dialect writes the query's `number`th (from 1) parameter."""

    async def _rows(self, template: str, *params: Any, settled: bool = True) -> Sequence[Row]:
        """`template`'s `{}`s are its parameters, in order."""
        sql = template.format(*(self._parameter(number) for number in range(1, len(params) + 1)))
        return await self._fetch(sql, list(params), settled=settled)

    async def get_account(self, account_id: str) -> Account | None:
        rows = await self._rows(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = {{}}", account_id)
        return account_from_row(rows[0]) if rows else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._rows(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id")
        return [account_from_row(row) for row in rows]

    async def find_key_by_hash(self, key_hash: str, *, settled: bool = False) -> ApiKey | None:
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = {{}}", key_hash, settled=settled)
        return key_from_row(rows[0]) if rows else None

    async def get_key(self, key_id: str) -> ApiKey | None:
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = {{}}", key_id)
        return key_from_row(rows[0]) if rows else None

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        where, params = ("", ()) if account_id is None else (" WHERE account_id = {}", (account_id,))
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys{where} ORDER BY created_at, id", *params)
        return [key_from_row(row) for row in rows]

    async def query_ledger(
        self, where: LedgerFilter, *, limit: int, order: Literal["asc", "desc"] = "desc", cursor: int | None = None
    ) -> list[LedgerRecord]:
        conditions = ledger_conditions(where)
        if cursor is not None:
            conditions.append(("seq > {}" if order == "asc" else "seq < {}", cursor))
        clause, params = _where(conditions)
        query = f"SELECT {LEDGER_COLUMNS} FROM ledger{clause} ORDER BY seq {order.upper()} LIMIT {{}}"
        return [ledger_from_row(row) for row in await self._rows(query, *params, limit)]

    async def read_only(self, template: str, *params: Any) -> Sequence[Row]:
        return await self._rows(template, *params)

    async def count_ledger(self, where: LedgerFilter, after_seq: int = 0) -> int:
        clause, params = _where([*ledger_conditions(where), ("seq > {}", after_seq)])
        (row,) = await self._rows(f"SELECT COUNT(*) AS n FROM ledger{clause}", *params)
        return int(row["n"])

    async def query_admin_audit(self, *, limit: int, cursor: int | None = None) -> list[AdminAuditRecord]:
        rows = await self._rows(
            f"SELECT {ADMIN_AUDIT_COLUMNS} FROM admin_audit WHERE seq < {{}} ORDER BY seq DESC LIMIT {{}}",
            cursor if cursor is not None else 2**63 - 1, limit, settled=False,
        )
        return [admin_audit_from_row(row) for row in rows]

    async def outbox_cursor(self, worker_id: str) -> int:
        rows = await self._rows("SELECT last_seq FROM outbox_cursors WHERE worker_id = {}", worker_id, settled=False)
        return int(rows[0]["last_seq"]) if rows else 0


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in conditions), [value for _, value in conditions]
