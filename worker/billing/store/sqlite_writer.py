"""Group commit: writes submitted on the event loop go to the billing database process in batches.

One batch is with the database process at a time; what callers submit meanwhile waits on the loop and goes
as the next batch. So a commit costs one message each way however many writes it holds, instead of one per
write. Every caller's future resolves after its batch's commit, i.e. once its write is durable; how a batch
is committed (a savepoint per job, items of one kind in one call) is in sqlite_server.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from worker.billing.store.sqlite_process import DatabaseProcess
from worker.billing.store.sqlite_server import ManyWork, WriteJob

logger = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCommitWriter:
    """Used from the one event loop that started it. Work must pickle: module-level functions, or
    `functools.partial` of them, taking the connection (they run in the database process)."""

    def __init__(self, database: DatabaseProcess, *, max_batch: int = 256) -> None:
        self._database = database
        self._max_batch = max_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Jobs waiting for the next batch, and the size of the batch with the database process.
        self._waiting: list[tuple[WriteJob, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sender = asyncio.ensure_future(self._send_batches())

    @property
    def queued(self) -> int:
        """Writes submitted and not yet committed."""
        return len(self._waiting) + self._in_flight

    async def submit(
        self, work: Callable[[sqlite3.Connection], T], *, after_commit: Callable[[], None] | None = None
    ) -> T:
        """Run `work` in a write transaction; returns its result once that transaction has committed.

        `after_commit` runs in the database process right after the commit, if `work` succeeded."""
        result: T = await self._enqueue(WriteJob(work=work, after_commit=after_commit))
        return result

    async def submit_item(self, many: ManyWork, item: Any) -> Any:
        """Like `submit`, for writes of one kind: items of the same `many` that meet in a batch are
        written by one `many(connection, items)` call."""
        return await self._enqueue(WriteJob(many=many, item=item))

    async def close(self) -> None:
        """Commit everything submitted so far, then stop sending."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._sender is not None:
            await self._sender

    def _enqueue(self, job: WriteJob) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the billing store is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("the billing store is used from another event loop than the one it opened on")
        future = loop.create_future()
        self._waiting.append((job, future))
        self._wake.set()
        return future

    async def _send_batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                self._in_flight = len(batch)
                await self._commit(batch)
                self._in_flight = 0
            if self._closed:
                return

    async def _commit(self, batch: list[tuple[WriteJob, asyncio.Future[Any]]]) -> None:
        try:
            outcomes, notes = await self._database.write([job for job, _ in batch])
        except Exception as error:  # the process could not be started, or died with the batch
            logger.error("billing write batch failed", extra={"batch": len(batch), "error": repr(error)})
            for _, future in batch:
                _resolve(future, None, error)
            return
        for note in notes:
            logger.log(note.level, note.message, extra=note.extra)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _resolve(future, outcome.result, outcome.error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting; the write itself has happened regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
