"""The billing database's own process: it owns the SQLite connections and runs the worker's commands (commands.py);
a process rather than threads in the worker because of the GIL (docs/hot-path.md).

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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from worker.billing.store.base import WriteOp
from worker.billing.store.commands import COMMANDS, run_now
from worker.billing.store.sql import in_dialect
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
    statements = SqliteStatements(db)
    try:
        db.execute("BEGIN IMMEDIATE")
        for write in batch.writes:
            db.execute("SAVEPOINT write")
            try:
                outcomes.append(Done(run_now(COMMANDS[write.op](statements, *write.args))))
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


class SqliteStatements:
    """The commands' statements on one connection (worker/billing/store/commands.py)."""

    sql = in_dialect("?{}")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in self.db.execute(sql, params)]

    async def count(self, sql: str, *params: Any) -> int:
        return self.db.execute(sql, params).rowcount


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
