"""The billing database's own process: it owns the SQLite connections and runs the commands the worker sends
(a process rather than threads in the worker because of the GIL: docs/hot-path.md).

Over one socket (worker/processes/rpc.py): a `Batch` of typed `Write`s commits in one transaction, each write in
a savepoint of its own so that one failure fails only that write; a `Query` runs on read-only connections beside
the writer (WAL), never behind a batch. The process ends when the worker's end of the socket closes, after
finishing what it was sent: a worker that is killed still has the batch it handed over committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from worker.billing.store.base import BalanceLimitExceeded, Refused, UnknownAccount, WriteOp
from worker.billing.store.records import MAX_BALANCE_MICRO, ReserveOutcome, utc_month
from worker.billing.store.sql import LEDGER_INSERT_COLUMNS, in_dialect
from worker.processes.rpc import Channel

BUSY_TIMEOUT_S = 30.0

class Write(msgspec.Struct, array_like=True):
    op: WriteOp
    args: list[Any]


class Batch(msgspec.Struct, tag=True, array_like=True):
    writes: list[Write]


class Query(msgspec.Struct, tag=True, array_like=True):
    """Read-only SQL (the readers' connections refuse writes); answered with its rows as column maps."""

    sql: str
    params: list[Any]


class Done(msgspec.Struct, tag=True, array_like=True):
    result: Any


class Failed(msgspec.Struct, tag=True, array_like=True):
    error: str  # the exception's class name: the worker raises the same kind
    detail: str


class Answer(msgspec.Struct, tag=True, array_like=True):
    outcomes: list[Done | Failed]  # one per write of a batch; one for a query
    batch_error: str | None = None  # why nothing of the batch committed


class DatabaseSettings(NamedTuple):
    path: Path
    synchronous: str  # "NORMAL" or "FULL"
    readers: int


def connect(settings: DatabaseSettings, *, query_only: bool = False) -> sqlite3.Connection:
    connection = sqlite3.connect(
        settings.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
    )
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA synchronous = {settings.synchronous}")
    connection.execute("PRAGMA foreign_keys = ON")
    # Savepoint and statement journals only roll back inside an open transaction (the WAL, not they,
    # makes commits durable): keep them in memory rather than in a temp file opened per batch.
    connection.execute("PRAGMA temp_store = MEMORY")
    if query_only:
        connection.execute("PRAGMA query_only = ON")
    return connection


def failed(error: BaseException) -> Failed:
    return Failed(type(error).__name__, str(error.args[0]) if len(error.args) == 1 else str(error))


def commit_batch(db: sqlite3.Connection, batch: Batch) -> Answer:
    outcomes: list[Done | Failed] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for write in batch.writes:
            db.execute("SAVEPOINT write")
            try:
                outcomes.append(Done(_WRITES[write.op](db, *write.args)))
            except Exception as error:  # noqa: BLE001  that caller gets its error; the rest of the batch commits
                db.execute("ROLLBACK TO write")
                outcomes.append(failed(error))
            db.execute("RELEASE write")
        db.execute("COMMIT")
    except Exception as error:  # noqa: BLE001  e.g. disk full or database locked: every caller hears of it
        with contextlib.suppress(sqlite3.Error):  # the callers hear of the first error
            if db.in_transaction:
                db.execute("ROLLBACK")
        return Answer([failed(error)] * len(batch.writes), batch_error=repr(error))
    return Answer(outcomes)


def run_query(db: sqlite3.Connection, query: Query) -> Answer:
    try:
        return Answer([Done([dict(row) for row in db.execute(query.sql, query.params)])])
    except Exception as error:  # noqa: BLE001  the query's caller hears why
        return Answer([failed(error)])


# The writes, by command: each runs inside the batch's transaction, in a savepoint of its own.
def _returning(db: sqlite3.Connection, sql: str, params: Any) -> dict[str, Any] | None:
    rows = db.execute(sql, params).fetchall()
    return dict(rows[0]) if rows else None


def _top_up(db: sqlite3.Connection, account_id: str, amount_micro: int) -> dict[str, Any]:
    row = _returning(db, _SQL.TOP_UP, (amount_micro, account_id, MAX_BALANCE_MICRO))
    if row is None:
        exists = db.execute(_SQL.ACCOUNT_EXISTS, (account_id,)).fetchone()
        raise (UnknownAccount if exists is None else BalanceLimitExceeded)(account_id)
    return row


def _create_key(db: sqlite3.Connection, *params: Any) -> dict[str, Any] | None:
    if db.execute(_SQL.ACCOUNT_EXISTS, (params[1],)).fetchone() is None:
        raise UnknownAccount(params[1])
    return _returning(db, _SQL.KEY_INSERT, params)


def _reserve(db: sqlite3.Connection, record_id: str, account_id: str, key_id: str, amount: int, holder: str,
             created_at: float, month: str) -> str:
    if db.execute(_SQL.KEY_RESERVE, (amount, key_id, month)).rowcount == 0:
        revoked = db.execute(_SQL.KEY_STATE, (key_id,)).fetchone()
        gone = revoked is None or revoked[0] is not None
        raise Refused((ReserveOutcome.key_revoked if gone else ReserveOutcome.spend_cap_reached).value)
    if db.execute(_SQL.ACCOUNT_RESERVE, (amount, account_id)).rowcount == 0:
        raise Refused(ReserveOutcome.insufficient_balance.value)
    db.execute(_SQL.RESERVATION_INSERT, (record_id, account_id, key_id, amount, holder, created_at))
    return ReserveOutcome.reserved.value


def _settle(db: sqlite3.Connection, *rows: list[Any]) -> list[int | None]:
    """Append ledger rows, and for each release its reservation and charge its cost; each row's seq, or None
    (and nothing charged) for a record id the ledger holds already."""
    return [_settle_row(db, row) for row in rows]


def _settle_row(db: sqlite3.Connection, row: list[Any]) -> int | None:
    inserted = _returning(db, _SQL.LEDGER_INSERT, row)
    if inserted is None:
        return None
    if row[_KEY_ID] is not None or row[_ACCOUNT_ID] is not None:
        held = _returning(db, _SQL.RESERVATION_DROP, (row[_RECORD_ID],))
        released, cost = (held["amount_micro"] if held else 0), row[_COST]
        if row[_KEY_ID] is not None:
            db.execute(_SQL.KEY_CHARGE, (released, utc_month(row[_RECEIVED_AT]), cost, row[_KEY_ID]))
        if row[_ACCOUNT_ID] is not None:
            db.execute(_SQL.ACCOUNT_CHARGE, (cost, released, row[_ACCOUNT_ID]))
    return int(inserted["seq"])


def _release(db: sqlite3.Connection, record_id: str | None, holder: str | None, older_than: float | None) -> int:
    """Drop one reservation (`record_id`), or `holder`'s and those made before `older_than`."""
    if record_id is not None:
        rows = db.execute(_SQL.RESERVATION_DROP, (record_id,)).fetchall()
    else:
        rows = db.execute(_SQL.RESERVATIONS_DROP_GONE, (holder, older_than)).fetchall()
    for key_id, account_id, amount in rows:
        db.execute(_SQL.KEY_UNRESERVE, (amount, key_id))
        db.execute(_SQL.ACCOUNT_UNRESERVE, (amount, account_id))
    return len(rows)


def _claim_worker(db: sqlite3.Connection, *params: Any) -> dict[str, Any] | None:
    """None when taken; else the holder's claim, unchanged."""
    if db.execute(_SQL.WORKER_CLAIM, params).rowcount == 1:
        return None
    return _returning(db, _SQL.WORKER_CLAIM_HOLDER, (params[0],))


def _one_row(sql: str, db: sqlite3.Connection, *params: Any) -> dict[str, Any] | None:
    return _returning(db, sql, params)


def _append_audit(db: sqlite3.Connection, *params: Any) -> int:
    return int(db.execute(_SQL.ADMIN_AUDIT_APPEND, params).fetchall()[0]["seq"])


def _changed_one(sql: str, db: sqlite3.Connection, *params: Any) -> bool:
    return bool(db.execute(sql, params).rowcount == 1)


_SQL = in_dialect("?{}")
_RECORD_ID, _KEY_ID, _ACCOUNT_ID, _COST, _RECEIVED_AT = (
    LEDGER_INSERT_COLUMNS.index(column)
    for column in ("record_id", "key_id", "account_id", "cost_micro", "received_at")
)
_WRITES: dict[str, Callable[..., Any]] = {
    "create_account": partial(_one_row, _SQL.ACCOUNT_INSERT), "top_up": _top_up, "create_key": _create_key,
    "revoke_key": partial(_one_row, _SQL.KEY_REVOKE), "reserve": _reserve, "settle": _settle, "release": _release,
    "append_audit": _append_audit, "claim_worker": _claim_worker,
    "renew_claim": partial(_changed_one, _SQL.WORKER_CLAIM_RENEW),
    "release_claim": partial(_changed_one, _SQL.WORKER_CLAIM_RELEASE),
    "advance_outbox": partial(_changed_one, _SQL.ADVANCE_OUTBOX),
    "save_uptime": partial(_changed_one, _SQL.REPLICA_UPTIME_SAVE),
}


async def serve(sock: socket.socket, settings: DatabaseSettings) -> None:
    """Answer the worker's commands until it closes the socket, then finish what was sent and return."""
    loop = asyncio.get_running_loop()
    local = threading.local()
    connections: list[sqlite3.Connection] = []

    def connection(query_only: bool) -> sqlite3.Connection:  # one per thread, opened on its first command
        if not hasattr(local, "db"):
            local.db = connect(settings, query_only=query_only)
            connections.append(local.db)
        return local.db  # type: ignore[no-any-return]

    def write(batch: Batch) -> Answer:
        try:
            db = connection(query_only=False)
        except Exception as error:  # noqa: BLE001  no database: every caller hears why
            return Answer([failed(error)] * len(batch.writes), batch_error=repr(error))
        return commit_batch(db, batch)

    def read(query: Query) -> Answer:
        try:
            return run_query(connection(query_only=True), query)
        except Exception as error:  # noqa: BLE001  no database: the query's caller hears why
            return Answer([failed(error)])

    writer = ThreadPoolExecutor(1, thread_name_prefix="billing-sqlite-writer")
    readers = ThreadPoolExecutor(settings.readers, thread_name_prefix="billing-sqlite-reader")

    def answer(call_id: int, outcomes: int, done: Future[Answer]) -> None:
        error = done.exception()
        if error is not None:  # every caller still gets an answer, never a wait without end
            channel.reply(call_id, Answer([failed(error)] * outcomes, batch_error=repr(error)))
        else:
            channel.reply(call_id, done.result())

    def on_request(request: Batch | Query, call_id: int) -> None:
        if isinstance(request, Batch):
            work, outcomes = writer.submit(write, request), len(request.writes)
        else:
            work, outcomes = readers.submit(read, request), 1
        work.add_done_callback(lambda done: loop.call_soon_threadsafe(answer, call_id, outcomes, done))

    channel: Channel[Batch | Query] = await Channel.over(sock, Batch | Query, on_request)
    await channel.closed.wait()
    await asyncio.to_thread(writer.shutdown, wait=True)  # the batches handed over commit even so
    await asyncio.to_thread(readers.shutdown, wait=True)
    for db in connections:
        db.close()


def main() -> None:
    """The process's entry point: argv is the socket's file descriptor, then the settings."""
    fd, path, synchronous, readers = sys.argv[1:5]
    # The worker decides when this process ends (by closing the socket once its writes are in): a Ctrl-C
    # or a signal to the whole process group must not cut a batch off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(serve(socket.socket(fileno=int(fd)), DatabaseSettings(Path(path), synchronous, int(readers))))
