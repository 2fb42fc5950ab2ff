"""The billing store on one SQLite file (the single-node default).

Durability: WAL journal. With `synchronous=NORMAL` (default) a commit reaches the WAL file but is
fsynced only at checkpoints: records survive the process being killed (SIGKILL included), not a power
loss or kernel crash. With NORMAL a response's record is first appended to the worker's journal (a file
beside the database, with the same durability; see journal.py) and reaches SQLite with the records of
the next 250 ms in one commit, so no stream waits for a commit. With `synchronous=FULL` every committed
batch is fsynced, so records survive a crash of the machine too; each stream then waits for its commit
and a disk sync before its last byte. Writes go through one thread in batches; reads use a small
thread pool of their own connections (WAL lets them read while the writer writes), and first wait for
the journaled records, so a read sees every record settled before it. The connections, the writer and the
readers live in a process of their own (sqlite_server.py says why); the work sent there is the module-level
functions at the end of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from worker.billing.audit import AdminAction, AdminAuditRecord
from worker.billing.money import MAX_BALANCE_MICRO
from worker.billing.records import (
    Account,
    ApiKey,
    LedgerEntry,
    LedgerFilter,
    LedgerRecord,
    NewApiKey,
    Reservation,
    ReserveOutcome,
    WorkerClaim,
    utc_month,
)
from worker.billing.store.base import BalanceLimitExceeded, DuplicateRecordId, LedgerStore, UnknownAccount
from worker.billing.store.journal import LedgerJournal
from worker.billing.store.rows import (
    ACCOUNT_COLUMNS,
    ADMIN_AUDIT_COLUMNS,
    ADMIN_AUDIT_INSERT,
    KEY_COLUMNS,
    KEY_INSERT_COLUMNS,
    KEY_INSERT_COUNT,
    LEDGER_COLUMNS,
    LEDGER_INSERT_COLUMNS,
    account_from_row,
    admin_audit_from_row,
    admin_audit_params,
    claim_from_row,
    claim_params,
    key_from_row,
    ledger_conditions,
    ledger_from_row,
    ledger_params,
    new_key_params,
)
from worker.billing.store.schema import SCHEMA_VERSION_TABLE, pending_migrations
from worker.billing.store.sql import (
    ACCOUNT_CHARGE,
    ACCOUNT_RESERVE,
    KEY_CHARGE,
    KEY_RESERVE,
    KEY_STATE,
    WORKER_CLAIM,
    WORKER_CLAIM_HOLDER,
    WORKER_CLAIM_RELEASE,
    WORKER_CLAIM_RENEW,
    for_sqlite,
)
from worker.billing.store.sqlite_process import DatabaseProcess
from worker.billing.store.sqlite_server import DatabaseSettings, connect
from worker.billing.store.sqlite_writer import GroupCommitWriter

T = TypeVar("T")
logger = logging.getLogger(__name__)
# Journaled records reach SQLite in batches this far apart (or this large), not one commit per response:
# each commit costs the writer thread a wake-up and the WAL pages of seven b-trees, so fewer, larger ones
# cost less per record (reads and shutdown hand the waiting records over at once).
JOURNAL_FLUSH_S = 0.25
JOURNAL_BATCH_MAX = 256
_KEY_RESERVE = for_sqlite(KEY_RESERVE)
_KEY_STATE = for_sqlite(KEY_STATE)
_ACCOUNT_RESERVE = for_sqlite(ACCOUNT_RESERVE)
_KEY_CHARGE = for_sqlite(KEY_CHARGE)
_ACCOUNT_CHARGE = for_sqlite(ACCOUNT_CHARGE)
_WORKER_CLAIM = for_sqlite(WORKER_CLAIM)
_WORKER_CLAIM_HOLDER = for_sqlite(WORKER_CLAIM_HOLDER)
_WORKER_CLAIM_RENEW = for_sqlite(WORKER_CLAIM_RENEW)
_WORKER_CLAIM_RELEASE = for_sqlite(WORKER_CLAIM_RELEASE)
_INSERT_LEDGER = (
    f"INSERT INTO ledger ({', '.join(LEDGER_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(LEDGER_INSERT_COLUMNS))}) "
    "ON CONFLICT (record_id) DO NOTHING"
)
_ADVANCE_OUTBOX = (
    "INSERT INTO outbox_cursors (worker_id, last_seq, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (worker_id) DO UPDATE SET last_seq = excluded.last_seq, "
    "updated_at = excluded.updated_at WHERE outbox_cursors.last_seq < excluded.last_seq"
)
# Where ledger_params puts what settling needs besides the row itself.
_RECORD_ID = LEDGER_INSERT_COLUMNS.index("record_id")
_KEY_ID = LEDGER_INSERT_COLUMNS.index("key_id")
_ACCOUNT_ID = LEDGER_INSERT_COLUMNS.index("account_id")
_COST = LEDGER_INSERT_COLUMNS.index("cost_micro")
_RECEIVED_AT = LEDGER_INSERT_COLUMNS.index("received_at")


class _Refused(Exception):
    def __init__(self, outcome: ReserveOutcome) -> None:
        super().__init__(outcome)  # in args, so that it pickles back from the database process
        self.outcome = outcome


class SqliteStore(LedgerStore):
    dialect = "sqlite"

    def __init__(self, path: Path, *, synchronous: Literal["full", "normal"], readers: int = 2) -> None:
        self._settings = DatabaseSettings(path, synchronous.upper(), readers)
        self._database = DatabaseProcess(self._settings)
        self._writer = GroupCommitWriter(self._database)
        # Journaled ledger rows not yet handed to the writer, and the batches of them it has not committed.
        self._journal: LedgerJournal | None = None
        self._journaled: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        self._journal_flush: asyncio.TimerHandle | None = None
        self._journal_batches: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, path: str | Path, *, synchronous: Literal["full", "normal"] = "normal") -> SqliteStore:
        store = cls(Path(path), synchronous=synchronous)
        await asyncio.to_thread(store._prepare)
        await store._database.start()
        store._writer.start()
        return store

    def _prepare(self) -> None:
        path = self._settings.path
        create_private_files(path)
        connection = connect(self._settings)
        try:
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode for {path} (journal_mode={mode})")
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(SCHEMA_VERSION_TABLE)
                applied = connection.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_version"
                ).fetchone()[0]
                for migration in pending_migrations(applied):
                    for statement in migration.sqlite:
                        connection.execute(statement)
                    connection.execute(
                        "INSERT INTO schema_version VALUES (?, ?, ?)",
                        (migration.version, migration.description, time.time()),
                    )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        finally:
            connection.close()

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        await self.flush()  # a read sees every record settled before it
        return await self._database.read(work)

    async def close(self) -> None:
        await self.flush()
        if self._journal is not None:
            self._journal.close()
        await self._writer.close()
        await self._database.close()

    @property
    def pending_writes(self) -> int:
        return self._writer.queued + len(self._journaled)

    # Accounts and keys.
    async def create_account(
        self, account_id: str, name: str, balance_micro: int, created_at: float
    ) -> Account:
        params = (account_id, name, balance_micro, created_at)
        return await self._writer.submit(partial(_create_account, params=params))

    async def get_account(self, account_id: str) -> Account | None:
        return await self._read(partial(_get_account, account_id=account_id))

    async def list_accounts(self) -> list[Account]:
        return await self._read(_list_accounts)

    async def top_up(self, account_id: str, amount_micro: int) -> Account:
        return await self._writer.submit(partial(_top_up, account_id=account_id, amount_micro=amount_micro))

    async def create_key(self, key: NewApiKey) -> ApiKey:
        return await self._writer.submit(partial(_create_key, key=key))

    async def find_key_by_hash(self, key_hash: str) -> ApiKey | None:
        return await self._read(partial(_one_key, column="key_hash", value=key_hash))

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await self._read(partial(_one_key, column="id", value=key_id))

    async def list_keys(self, account_id: str | None = None) -> list[ApiKey]:
        return await self._read(partial(_list_keys, account_id=account_id))

    async def revoke_key(self, key_id: str, revoked_at: float) -> ApiKey | None:
        return await self._writer.submit(partial(_revoke_key, key_id=key_id, revoked_at=revoked_at))

    # Money on the request path.
    async def reserve(self, reservation: Reservation) -> ReserveOutcome:
        try:
            return await self._writer.submit(partial(_reserve, r=reservation))
        except _Refused as refused:
            return refused.outcome

    async def settle(self, record: LedgerEntry) -> int:
        seq: int | None = await self._writer.submit_item(_settle_rows, ledger_params(record))
        if seq is None:
            raise DuplicateRecordId(record.record_id)
        return seq

    async def start_journal(self, worker_id: str) -> int:
        if self._settings.synchronous != "NORMAL":  # FULL promises more than a file append in the page cache
            return 0
        path = self._settings.path
        root = path.with_name(f"{path.name}.journal")
        await asyncio.to_thread(root.mkdir, mode=0o700, exist_ok=True)  # `mkdir(parents=True)` makes it 0755
        journal, leftovers = await asyncio.to_thread(LedgerJournal.open, root / worker_id)
        added = 0
        for path in leftovers:
            rows = await asyncio.to_thread(LedgerJournal.read, path)
            seqs = await self._writer.submit(
                partial(_settle_each, rows=rows), after_commit=partial(path.unlink, missing_ok=True)
            )
            added += sum(seq is not None for seq in seqs)
        if leftovers:
            logger.warning(
                "settled the ledger journal of this worker's previous run",
                extra={"files": len(leftovers), "records_added": added},
            )
        self._journal = journal
        return added

    async def settle_soon(self, record: LedgerEntry) -> asyncio.Future[int]:
        if self._journal is None:
            return await super().settle_soon(record)
        row = ledger_params(record)
        self._journal.append(row)
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[int] = loop.create_future()
        self._journaled.append((row, settled))
        if len(self._journaled) >= JOURNAL_BATCH_MAX:
            self._hand_journaled_over()
        elif self._journal_flush is None:
            self._journal_flush = loop.call_later(JOURNAL_FLUSH_S, self._hand_journaled_over)
        return settled

    def _hand_journaled_over(self) -> None:
        if self._journal_flush is not None:
            self._journal_flush.cancel()
            self._journal_flush = None
        if not self._journaled:
            return
        assert self._journal is not None
        batch, self._journaled = self._journaled, []
        path = self._journal.seal()
        assert path is not None  # the batch's rows were appended to it
        task = asyncio.ensure_future(self._settle_journaled(batch, path))
        self._journal_batches.add(task)
        task.add_done_callback(self._journal_batches.discard)

    async def _settle_journaled(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[int]]], path: Path
    ) -> None:
        try:
            seqs = await self._writer.submit(
                partial(_settle_each, rows=[row for row, _ in batch]),
                after_commit=partial(path.unlink, missing_ok=True),
            )
        except Exception as error:  # the rows stay in the journal file; the next start settles them
            for _, settled in batch:
                settled.set_exception(error)
            return
        for (row, settled), seq in zip(batch, seqs, strict=True):
            if seq is None:
                settled.set_exception(DuplicateRecordId(row[_RECORD_ID]))
            else:
                settled.set_result(seq)

    async def flush(self) -> None:
        self._hand_journaled_over()
        if self._journal_batches:
            await asyncio.gather(*self._journal_batches, return_exceptions=True)

    async def release_reservation(self, record_id: str) -> bool:
        return await self._release("record_id = ?", (record_id,)) > 0

    async def release_reservations(self, holder: str, older_than: float | None = None) -> int:
        return await self._release(
            "holder = ? OR created_at < ?", (holder, older_than if older_than is not None else float("-inf"))
        )

    async def _release(self, condition: str, params: tuple[Any, ...]) -> int:
        return await self._writer.submit(partial(_release, condition=condition, params=params))

    # The ledger.
    async def query_ledger(
        self,
        where: LedgerFilter,
        *,
        limit: int,
        order: Literal["asc", "desc"] = "desc",
        cursor: int | None = None,
    ) -> list[LedgerRecord]:
        conditions = ledger_conditions(where)
        if cursor is not None:
            conditions.append(("seq > {}" if order == "asc" else "seq < {}", cursor))
        clause, params = _where(conditions)
        query = f"SELECT {LEDGER_COLUMNS} FROM ledger{clause} ORDER BY seq {order.upper()} LIMIT ?"
        return await self._read(partial(_ledger_records, query=query, params=(*params, limit)))

    async def count_ledger(self, where: LedgerFilter, after_seq: int = 0) -> int:
        clause, params = _where([*ledger_conditions(where), ("seq > {}", after_seq)])
        return await self._read(partial(_count, query=f"SELECT COUNT(*) FROM ledger{clause}", params=params))

    # The admin audit trail.
    async def append_admin_audit(self, action: AdminAction) -> int:
        return await self._writer.submit(partial(_append_admin_audit, params=admin_audit_params(action)))

    async def query_admin_audit(self, *, limit: int, cursor: int | None = None) -> list[AdminAuditRecord]:
        return await self._read(partial(_admin_audit_records, limit=limit, cursor=cursor))

    # The outbox.
    async def outbox_cursor(self, worker_id: str) -> int:
        return await self._read(partial(_outbox_cursor, worker_id=worker_id))

    async def claim_worker_id(
        self, claim: WorkerClaim, stale_before: float, gone_instance: str | None = None
    ) -> WorkerClaim | None:
        return await self._writer.submit(
            partial(_claim_worker_id, claim=claim, stale_before=stale_before, gone_instance=gone_instance)
        )

    async def renew_worker_claim(self, worker_id: str, instance_id: str, now: float) -> bool:
        return await self._writer.submit(partial(_changed_one, query=_WORKER_CLAIM_RENEW,
                                                 params=(worker_id, instance_id, now)))

    async def release_worker_claim(self, worker_id: str, instance_id: str) -> None:
        await self._writer.submit(
            partial(_changed_one, query=_WORKER_CLAIM_RELEASE, params=(worker_id, instance_id))
        )

    async def advance_outbox(self, worker_id: str, seq: int, now: float) -> None:
        await self._writer.submit(partial(_changed_one, query=_ADVANCE_OUTBOX, params=(worker_id, seq, now)))


# The work run in the database process (sqlite_server.py): module-level, so that it pickles.
def _create_account(db: sqlite3.Connection, params: tuple[Any, ...]) -> Account:
    row = db.execute(
        f"INSERT INTO accounts (id, name, balance_micro, created_at) VALUES (?, ?, ?, ?) "
        f"RETURNING {ACCOUNT_COLUMNS}",
        params,
    ).fetchone()
    return account_from_row(row)


def _get_account(db: sqlite3.Connection, account_id: str) -> Account | None:
    row = db.execute(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone()
    return account_from_row(row) if row else None


def _list_accounts(db: sqlite3.Connection) -> list[Account]:
    rows = db.execute(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id").fetchall()
    return [account_from_row(row) for row in rows]


def _top_up(db: sqlite3.Connection, account_id: str, amount_micro: int) -> Account:
    row = db.execute(
        f"UPDATE accounts SET balance_micro = balance_micro + ?1 WHERE id = ?2 AND balance_micro + ?1 <= ?3 "
        f"RETURNING {ACCOUNT_COLUMNS}",
        (amount_micro, account_id, MAX_BALANCE_MICRO),
    ).fetchone()
    if row is None:
        if db.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone() is None:
            raise UnknownAccount(account_id)
        raise BalanceLimitExceeded(account_id)
    return account_from_row(row)


def _create_key(db: sqlite3.Connection, key: NewApiKey) -> ApiKey:
    if db.execute("SELECT 1 FROM accounts WHERE id = ?", (key.account_id,)).fetchone() is None:
        raise UnknownAccount(key.account_id)
    row = db.execute(
        f"INSERT INTO api_keys ({KEY_INSERT_COLUMNS}) VALUES ({', '.join('?' * KEY_INSERT_COUNT)}) RETURNING {KEY_COLUMNS}",
        new_key_params(key),
    ).fetchone()
    return key_from_row(row)


def _one_key(db: sqlite3.Connection, column: str, value: str) -> ApiKey | None:
    row = db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE {column} = ?", (value,)).fetchone()
    return key_from_row(row) if row else None


def _list_keys(db: sqlite3.Connection, account_id: str | None) -> list[ApiKey]:
    if account_id is None:
        rows = db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall()
    else:
        rows = db.execute(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = ? ORDER BY created_at, id", (account_id,)
        ).fetchall()
    return [key_from_row(row) for row in rows]


def _revoke_key(db: sqlite3.Connection, key_id: str, revoked_at: float) -> ApiKey | None:
    row = db.execute(
        f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING {KEY_COLUMNS}",
        (revoked_at, key_id),
    ).fetchone()
    return key_from_row(row) if row else None


def _reserve(db: sqlite3.Connection, r: Reservation) -> ReserveOutcome:
    if db.execute(_KEY_RESERVE, (r.amount_micro, r.key_id, r.month)).rowcount == 0:
        revoked = db.execute(_KEY_STATE, (r.key_id,)).fetchone()
        raise _Refused(
            ReserveOutcome.key_revoked
            if revoked is None or revoked[0] is not None
            else ReserveOutcome.spend_cap_reached
        )
    if db.execute(_ACCOUNT_RESERVE, (r.amount_micro, r.account_id)).rowcount == 0:
        raise _Refused(ReserveOutcome.insufficient_balance)
    db.execute(
        "INSERT INTO reservations (record_id, account_id, key_id, amount_micro, holder, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (r.record_id, r.account_id, r.key_id, r.amount_micro, r.holder, r.created_at),
    )
    return ReserveOutcome.reserved


def _release(db: sqlite3.Connection, condition: str, params: tuple[Any, ...]) -> int:
    rows = db.execute(
        f"DELETE FROM reservations WHERE {condition} RETURNING key_id, account_id, amount_micro", params
    ).fetchall()
    for key_id, account_id, amount in rows:
        db.execute("UPDATE api_keys SET reserved_micro = reserved_micro - ? WHERE id = ?", (amount, key_id))
        db.execute(
            "UPDATE accounts SET reserved_micro = reserved_micro - ? WHERE id = ?", (amount, account_id)
        )
    return len(rows)


def _ledger_records(db: sqlite3.Connection, query: str, params: tuple[Any, ...]) -> list[LedgerRecord]:
    return [ledger_from_row(row) for row in db.execute(query, params).fetchall()]


def _count(db: sqlite3.Connection, query: str, params: list[Any]) -> int:
    return int(db.execute(query, params).fetchone()[0])


def _append_admin_audit(db: sqlite3.Connection, params: tuple[Any, ...]) -> int:
    placeholders = ", ".join("?" * len(params))
    return int(db.execute(f"INSERT INTO admin_audit ({ADMIN_AUDIT_INSERT}) VALUES ({placeholders})", params).lastrowid)


def _admin_audit_records(db: sqlite3.Connection, limit: int, cursor: int | None) -> list[AdminAuditRecord]:
    rows = db.execute(
        f"SELECT {ADMIN_AUDIT_COLUMNS} FROM admin_audit WHERE seq < ? ORDER BY seq DESC LIMIT ?",
        (cursor if cursor is not None else 2**63 - 1, limit),
    ).fetchall()
    return [admin_audit_from_row(row) for row in rows]


def _outbox_cursor(db: sqlite3.Connection, worker_id: str) -> int:
    row = db.execute("SELECT last_seq FROM outbox_cursors WHERE worker_id = ?", (worker_id,)).fetchone()
    return int(row[0]) if row else 0


def _claim_worker_id(
    db: sqlite3.Connection, claim: WorkerClaim, stale_before: float, gone_instance: str | None
) -> WorkerClaim | None:
    if db.execute(_WORKER_CLAIM, (*claim_params(claim), stale_before, gone_instance or "")).rowcount == 1:
        return None
    return claim_from_row(db.execute(_WORKER_CLAIM_HOLDER, (claim.worker_id,)).fetchone())


def _changed_one(db: sqlite3.Connection, query: str, params: tuple[Any, ...]) -> bool:
    return bool(db.execute(query, params).rowcount == 1)


def _settle_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int | None]:
    """Append ledger rows and, in the same transaction, release their reservations and charge their
    costs. Returns each row's seq, or None for a record id the ledger holds already (not charged)."""
    inserted = db.executemany(_INSERT_LEDGER, rows).rowcount
    if inserted != len(rows):
        if len(rows) == 1:
            return [None]
        raise DuplicateRecordId("a record of this batch is in the ledger already")  # the writer retries each
    # One writer inside one transaction: AUTOINCREMENT numbers these rows consecutively.
    last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    for row in rows:
        if row[_KEY_ID] is not None or row[_ACCOUNT_ID] is not None:
            _charge(db, row)
    return list(range(last - len(rows) + 1, last + 1))


def _settle_each(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int | None]:
    """`_settle_rows`, and when a row's record id is in the ledger already, row by row."""
    db.execute("SAVEPOINT rows")
    try:
        seqs = _settle_rows(db, rows)
    except DuplicateRecordId:
        db.execute("ROLLBACK TO rows")
        seqs = [_settle_rows(db, [row])[0] for row in rows]
    db.execute("RELEASE rows")
    return seqs


def _charge(db: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    held = db.execute(
        "DELETE FROM reservations WHERE record_id = ? RETURNING amount_micro", (row[_RECORD_ID],)
    ).fetchone()
    released = held[0] if held else 0
    cost = row[_COST]
    if row[_KEY_ID] is not None:
        db.execute(_KEY_CHARGE, (released, utc_month(row[_RECEIVED_AT]), cost, row[_KEY_ID]))
    if row[_ACCOUNT_ID] is not None:
        db.execute(_ACCOUNT_CHARGE, (cost, released, row[_ACCOUNT_ID]))


def create_private_files(path: Path) -> None:
    """Make the database file readable by this user only (0600), and its directory, when this makes it,
    0700. SQLite gives its WAL and shared-memory files the database file's mode. A directory that exists
    already (the working directory, say) keeps its mode: the files in it are private anyway."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        # Files an older worker created with the umask's 0644: close them to others too.
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(sql.format("?") for sql, _ in conditions), [
        value for _, value in conditions
    ]
