"""The billing store on one SQLite file (the single-node default); see docs/hot-path.md and docs/architecture.md.

WAL journal. `synchronous=NORMAL` (default): records survive the process being killed, not a power loss; a
response's record is appended to the worker's journal (journal.py), then committed with the next 250 ms of
records, so no stream waits for a commit. `synchronous=FULL`: every batch is fsynced, and each stream waits for
its commit. Writes go through the group commit (group_commit.py) to the database process (sqlite_server.py);
reads go to its readers, and reads of balances and the ledger first wait for the journaled records (key
look-ups do not: the reservation re-checks a key's spend itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Literal

from worker.billing.store.base import (
    BalanceLimitExceeded,
    DuplicateRecordId,
    LedgerStore,
    Refused,
    Row,
    UnknownAccount,
    WriteOp,
)
from worker.billing.store.commands import migrate, run_now
from worker.billing.store.database_process import DatabaseProcess
from worker.billing.store.group_commit import GroupCommit
from worker.billing.store.journal import JournaledSettlements, LedgerJournal
from worker.billing.store.records import LedgerEntry
from worker.billing.store.sql import ledger_params
from worker.billing.store.sqlite_server import (
    Batch,
    DatabaseSettings,
    Done,
    Failed,
    Query,
    SqliteStatements,
    Write,
    connect,
)

logger = logging.getLogger(__name__)
# The kinds of failure the database process reports by name that callers tell apart.
_ERRORS: dict[str, type[Exception]] = {
    "UnknownAccount": UnknownAccount, "BalanceLimitExceeded": BalanceLimitExceeded, "Refused": Refused,
    "IntegrityError": sqlite3.IntegrityError, "OperationalError": sqlite3.OperationalError,
}


def _raised(failure: Failed) -> Exception:
    kind = _ERRORS.get(failure.error)
    return kind(failure.detail) if kind is not None else RuntimeError(f"{failure.error}: {failure.detail}")


class SqliteStore(LedgerStore):
    dialect = "sqlite"

    def __init__(self, path: Path, *, synchronous: Literal["full", "normal"]) -> None:
        self._settings = DatabaseSettings(path, synchronous.upper(), readers=2)
        self.database = DatabaseProcess(self._settings)
        self._writes: GroupCommit[Write, Any] = GroupCommit(self._commit)
        self._journaled: JournaledSettlements | None = None  # with synchronous=NORMAL, once journaling

    @classmethod
    async def open(cls, path: str | Path, *, synchronous: Literal["full", "normal"] = "normal") -> SqliteStore:
        store = cls(Path(path), synchronous=synchronous)
        try:
            await asyncio.to_thread(store._prepare)
            await store.database.start()
        except BaseException:
            await store.close()
            raise
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
                run_now(migrate(SqliteStatements(connection), "sqlite"))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        finally:
            connection.close()

    async def _commit(self, writes: list[Write]) -> list[Any]:
        answer = await self.database.call(Batch(writes))
        if answer.batch_error is not None:
            logger.error("billing write batch failed", extra={"batch": len(writes), "error": answer.batch_error})
        return [o.result if isinstance(o, Done) else _raised(o) for o in answer.outcomes]

    async def _write(self, op: WriteOp, *args: Any) -> Any:
        return await self._writes.submit(Write(op, list(args)))

    async def _fetch(self, sql: str, params: list[Any], *, settled: bool) -> list[Row]:
        if settled:
            await self.flush()
        (outcome,) = (await self.database.call(Query(sql, params))).outcomes
        if isinstance(outcome, Failed):
            raise _raised(outcome)
        rows: list[Row] = outcome.result
        return rows

    def _parameter(self, number: int) -> str:
        return f"?{number}"

    async def close(self) -> None:
        if self._journaled is not None:
            await self._journaled.close()
        await self._writes.close()
        await self.database.close()

    @property
    def pending_writes(self) -> int:
        return self._writes.pending + (self._journaled.pending if self._journaled is not None else 0)

    async def settle(self, record: LedgerEntry) -> int:
        seqs: list[int | None] = await self._write("settle", ledger_params(record))
        (seq,) = seqs
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
        for leftover in leftovers:
            seqs = await self._settle_rows(await asyncio.to_thread(LedgerJournal.read, leftover))
            if failed := next((seq for seq in seqs if isinstance(seq, BaseException)), None):
                raise failed
            leftover.unlink(missing_ok=True)
            added += sum(seq is not None for seq in seqs)
        if leftovers:
            logger.warning(
                "settled the ledger journal of this worker's previous run",
                extra={"files": len(leftovers), "records_added": added},
            )
        self._journaled = JournaledSettlements(journal, self._settle_rows)
        return added

    async def settle_soon(self, record: LedgerEntry) -> asyncio.Future[int]:
        if self._journaled is None:
            return await super().settle_soon(record)
        return self._journaled.keep(ledger_params(record))

    async def _settle_rows(self, rows: list[tuple[Any, ...]]) -> list[int | BaseException | None]:
        """One write for the lot: each row's outcome, or the error that failed them all (their file stays)."""
        try:
            seqs: list[int | BaseException | None] = await self._write("settle", *rows)
        except Exception as error:  # noqa: BLE001  every row's caller hears why
            return [error] * len(rows)
        return seqs

    async def flush(self) -> None:
        if self._journaled is not None:
            await self._journaled.flush()


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
